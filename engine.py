"""The engine: the public API (LLM), what the user sees (OutputProcessor), one step on the device (ModelRunner).

The idea (vLLM V1): each step the scheduler hands a token budget to requests; the runner lays their
scheduled tokens out as ONE flat batch (prefill chunks and decodes mixed), runs the model once and
samples a token for each request that reached the end of its known tokens (and one per draft). Its path:
LLM.generate -> _run (_add_request) -> _step: Scheduler.schedule -> ModelRunner.execute
(prepare_inputs, run_model, sampler.sample) -> _collect: Scheduler.update -> a RequestOutput.

Output flows one way: LLM alone calls the scheduler; the OutputProcessor returns what to stop; the
runner lays rows out in its own order and keys each sampled token by its request. A final output
stays in the engine until it is in its caller's hands, so an interrupt never loses one. Under tensor
parallelism rank 0 runs all three and broadcasts each step's input buffer to the other ranks' runners (serve).
Never touches: block bookkeeping (kv_cache.py), stop rules (scheduler.py), arithmetic on logits
(sampler.py), model and kernel internals.
"""
import contextlib
import gc
import itertools
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
import weakref
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from attention import FP8, AttentionMetadata, token_slots
from kv_cache import allocate_kv_cache, cdiv, check_kv_capacity, kv_cache_bytes_per_block, num_blocks_from_memory
from model import (SHAPES, Tokenizer, TokenStream, Transformer, load_model, load_tensors, load_tokenizer, quantize_fp8,
                   random_model, read_config, resolve_device_and_dtype, shard_config)
from sampler import SamplingTensors, accept_drafts, logits_adjustment, logprobs_of, sample, seed_for, to_device
from scheduler import (EngineConfig, Request, RequestStatus, SamplingParams, ScheduledRequest, Scheduler,
                       SchedulerOutput, find_stop_string)

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None           # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # with logprobs: the sum of the sampled tokens' logprobs
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while running
    stop_reason: int | str | None = None  # the stop token id or string that ended it (None: EOS, length, abort)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None  # None for the first token, then one dict each
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # why the request failed, when finish_reason == "error"


@dataclass(eq=False)
class Completion:
    """The engine's own state of one completion being generated (the scheduler holds the rest)."""
    request: Request
    index: int
    group: "RequestGroup"
    stream: TokenStream | None  # the incremental detokenizer; None: no text
    text: str = ""
    num_decoded: int = 0        # output tokens already pushed through `stream`
    num_searched: int = 0       # characters of text already searched for stop strings
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass(eq=False)
class RequestGroup:
    """A request of the user: its prompt and n completions, each a scheduler request (sharing the
    prompt's full blocks through the prefix cache)."""
    request_id: str
    prompt: str | None
    completions: list[Completion]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    owner: int | None  # the generate() or stream() loop waiting for it; None: add_request's, for step()

    @property
    def finished(self) -> bool:
        return all(completion.request.status.is_finished for completion in self.completions)


@dataclass
class EngineStats:  # counters for bench.py: what each step had to read from memory
    steps: int = 0
    graph_steps: int = 0
    output_tokens: int = 0
    context_tokens_read: int = 0  # sum over steps of every scheduled request's context length
    draft_tokens: int = 0           # speculative decoding: drafts proposed,
    accepted_draft_tokens: int = 0  # of which accepted,
    draft_request_steps: int = 0    # in this many (request, step) pairs: each emits 1 + accepted / this tokens


# ---- LLM: requests in, outputs out. ---------------------------------------------------------------------------------

class LLM:
    """`model`: a Hugging Face checkpoint directory, or a name in model.SHAPES (random weights, token-id
    prompts); `engine_args`: EngineConfig's. Thread-safe: a lock runs one step at a time, and each
    generate() or stream() gets exactly its own outputs."""

    def __init__(self, model: str, **engine_args):
        config = EngineConfig(**engine_args)
        self.tp = start_tensor_parallel(model, config)  # None: one process (under torchrun, ranks > 0 exit in here)
        if self.tp:  # the workers end when this LLM is closed or collected, or at exit
            weakref.finalize(self, self.tp.close)
        with self.tp.collectives(atomic=False) if self.tp else contextlib.nullcontext():  # a failure stops every rank
            network, self.tokenizer = _load(model, config)
            if config.quantization == "fp8":  # online, after loading, as vLLM (an fp8 checkpoint's weights already are)
                quantize_fp8(network)
            limit = network.config.max_position_embeddings
            if config.max_model_len is not None and config.max_model_len > limit:
                raise ValueError(f"max_model_len={config.max_model_len}: must be at most {limit} "
                                 "(the model's max_position_embeddings)")
            self.config = config = replace(config, max_model_len=config.max_model_len or limit)
            self.runner = ModelRunner(network, config, self.tp)
        # Generation stops on the model's EOS ids (generation_config.json) and the tokenizer's.
        eos = [*network.config.eos_token_ids, *(self.tokenizer.eos_token_ids if self.tokenizer else [])]
        self.scheduler = Scheduler(config, self.runner.num_blocks, network.config.vocab_size, eos,
                                   network.config.attention_parity_context)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats, self.rng = self.runner.stats, random.Random(config.seed)  # rng: seeds of requests that bring none
        self.in_flight: InFlight | None = None
        self.lock = threading.RLock()
        self.loop_ids = itertools.count(1)

    # ---- public API ---------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion (default sampling_params: the checkpoint's), outputs in input order; a bad
        prompt fails alone (finish_reason "error"). add_request()'s requests share the batches; step() returns
        what they produced. If it raises (Ctrl-C too), its own requests are aborted."""
        order, results = [], {}
        with contextlib.closing(self._run(prompts, sampling_params, order, stream=False)) as outputs:
            for output in _progress(outputs, order, self.stats, enabled=use_tqdm and sys.stderr.isatty()):
                results[output.request_id] = output
        return [results[request_id] for request_id in order]

    def stream(self, prompts, sampling_params=None):
        """generate() as it happens: yields RequestOutputs carrying only what is new since the same request's
        last one (token ids, text, logprobs, prompt logprobs), requests interleaved in the order their tokens
        come; each request's last one has finished=True. Text comes in whole characters, held back while it
        may still become a stop string. Closing it early (close(), break) aborts the requests still running."""
        sent = {}  # request id -> its last output (cumulative)
        with contextlib.closing(self._run(prompts, sampling_params, [], stream=True)) as outputs:
            for output in outputs:
                yield _delta(output, sent.get(output.request_id))
                sent[output.request_id] = output

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None, *, continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """generate() on one conversation (a list of {"role", "content"} dicts) or a list of them, rendered
        by chat_prompt()."""
        options = dict(add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools,
                       continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
        return self.generate([self.chat_prompt(c, **options) for c in _as_conversations(messages)], sampling_params,
                             use_tqdm)

    def chat_prompt(self, conversation: list[dict], add_generation_prompt: bool = True, chat_template=None, *,
                    continue_final_message: bool = False, tools: list[dict] | None = None,
                    chat_template_kwargs: dict | None = None) -> dict:
        """One conversation as chat() prompts the model: {"prompt": its text, "prompt_token_ids": its ids}, as HF's
        apply_chat_template(conversation, tools=, continue_final_message=, **chat_template_kwargs) renders it;
        OpenAI content parts as vLLM renders them (Tokenizer.apply_chat_template)."""
        if self.tokenizer is None:
            raise ValueError("chat: this model has no tokenizer")
        if not isinstance(chat_template_kwargs, dict | None):
            raise ValueError(f"chat: chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt, chat_template, tools,
                                                  continue_final_message, **(chat_template_kwargs or {}))
        # The template writes BOS itself where the model wants one: encode adds no second one.
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None) -> None:
        """Queue one request (its n completions) for step(). Raises ValueError naming what is wrong with it."""
        self._add_request(request_id, prompt, sampling_params, owner=None)

    def step(self) -> list[RequestOutput]:
        """One step: add_request()'s requests that moved, and each final output once (also of requests
        that finished while generate() or stream() ran the steps)."""
        finals = {}
        try:
            with self.lock:
                outputs = [self.output_processor.output_of(g) for g in self._step() if g.owner is None and not g.finished]
                finals = self.output_processor.finals.pop(None, {})
                return outputs + list(finals.values())
        except BaseException:  # an interrupt before they reached the caller: the next step() returns them
            with self.lock:
                self.output_processor.finals.setdefault(None, {}).update(finals)
            raise

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request (all its completions) now and free its blocks: its final output, or None if it
        had already ended. A stream()'s request ends in the stream too."""
        with self.lock:
            if (group := self.output_processor.groups.get(request_id)) is None:
                return None
            for completion in group.completions:
                if not completion.request.status.is_finished:
                    self.scheduler.abort(completion.request.request_id)
            output = self.output_processor.finish(group, keep=group.owner is not None)
            self._settle()  # the last request gone: the engine ends idle
            return output

    def has_unfinished_requests(self) -> bool:
        """Whether a request is running, or a final output waits for step()."""
        return self.scheduler.has_unfinished_requests() or bool(self.output_processor.finals.get(None))

    def close(self) -> None:
        """Stop the tensor-parallel workers now (collecting the LLM or exiting does it too); later calls fail."""
        if self.tp:
            self.tp.close()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation_config.json sampling fields, else vLLM's defaults."""
        return SamplingParams(**self.runner.model.config.sampling_defaults)

    def load_weights(self, weights) -> None:
        """Update weights in place from Hugging Face-named tensors (a dict or (name, tensor) pairs), mapped as
        loading maps them: for RL loops. The prefix cache is reset (its K/V came from the old weights); CUDA
        graphs read the same tensors; a step still in flight (of ended requests) is finished first."""
        with self.lock:
            if self.scheduler.has_unfinished_requests():
                raise RuntimeError("load_weights: requests are still running; finish or abort them first")
            self._settle()
            try:
                if self.tp:  # every rank loads its part of the same tensors
                    with self.tp.collectives():
                        weights = share_weights(weights, self.runner)
                load_tensors(self.runner.model, weights, "load_weights")
            finally:  # even a load that failed half-way has changed weights
                self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: no later request reuses a block computed before now."""
        with self.lock:
            self.scheduler.kv_cache_manager.forget_cached_blocks()

    # ---- the step loop ------------------------------------------------------------------------

    def _step(self) -> list[RequestGroup]:
        """One step; the groups whose requests moved (a token, or an end). With async scheduling it
        launches step N+1 *before* waiting for step N's tokens, so the CPU's scheduling and input
        building hide behind the GPU's forward pass. A step that fails or is interrupted is undone."""
        try:
            moved = []
            if self.in_flight is not None and self.scheduler.drafting():  # drafts need every token known: no overlap
                moved, self.in_flight = self._collect(self.in_flight), None
            schedule = self.scheduler.schedule()
            launched = self.runner.execute(schedule, self.in_flight) if schedule.scheduled else None
            overlap = self.config.async_scheduling and not (launched and launched.plan.drafts)
            collect, self.in_flight = (self.in_flight, launched) if overlap else (launched, None)
            moved += self._collect(collect) if collect is not None else []
            if self.in_flight is not None and not self.scheduler.has_unfinished_requests():  # the engine ends idle
                moved, self.in_flight = moved + self._collect(self.in_flight), None
            if launched is collect is None and not schedule.finished and self.scheduler.has_unfinished_requests():
                raise RuntimeError("the scheduler made no progress with requests waiting: this is a bug")
            return self.output_processor.groups_of(schedule.finished + moved)
        except BaseException:  # Ctrl-C too: an interrupted step is undone like a failed one
            self._recover()
            raise

    def _collect(self, flight: "InFlight") -> list[Request]:
        """Wait for a step's tokens and hand them to the scheduler: the requests that got one."""
        tokens = flight.sampled_token_ids()
        moved = [request for request in tokens if not request.status.is_finished]  # update() appends to these
        self.output_processor.add_logprobs(flight, tokens)
        self.scheduler.update(flight.plan.schedule, tokens)
        for request, stop, num_tokens in self.output_processor.find_stop_strings(moved):
            self.scheduler.stop_at_string(request, stop, num_tokens)
        self.stats.output_tokens += sum(len(tokens[request]) for request in moved)
        for request, drafts in flight.plan.drafts.items():
            self.stats.draft_tokens += len(drafts)
            self.stats.accepted_draft_tokens += len(tokens[request]) - 1
        self.stats.draft_request_steps += len(flight.plan.drafts)
        return moved

    def _recover(self) -> None:
        """After a failed or interrupted step: drop the steps in flight, let the scheduler undo
        every unfinished step (their requests recompute, their cached blocks are forgotten), and
        keep the final outputs of requests that finished before the failure."""
        self.in_flight = None
        if self.runner.on_cuda:  # dropped steps may still read the host buffers: let them finish first
            with contextlib.suppress(RuntimeError):  # a device in an error state: the first error is the one to see
                torch.cuda.synchronize(self.runner.device)
        self.scheduler.recover()
        for request, stop, num_tokens in self.output_processor.trim_after_failure():
            self.scheduler.stop_at_string(request, stop, num_tokens)
        for group in [group for group in self.output_processor.groups.values() if group.finished]:
            self.output_processor.finish(group, keep=True)

    def _settle(self) -> None:
        """With no request left to run, collect the step in flight (its tokens are all discarded)."""
        if self.in_flight is not None and not self.scheduler.has_unfinished_requests():
            self._step()

    def _run(self, prompts, sampling_params, order: list[str], stream: bool):
        """A generate() or stream() loop: queue each prompt under a new id (appended to `order` as it goes), yield
        the error outputs of those refused, then step until the others end, yielding their final outputs and with
        `stream` their outputs as they move. Other loops' requests move too; their outputs wait for them. However
        the loop ends (done, raised, or its reader stopped), its requests still running are aborted and its outputs
        nobody will read dropped, so no block is held for a reader that is gone."""
        owner, failed, waiting = next(self.loop_ids), [], set()
        try:  # from the first prompt queued: whatever happens, none of them outlives the loop
            with self.lock:
                for prompt, params in _prompts_with_params(prompts, sampling_params):
                    order.append(request_id := self.output_processor.new_request_id())
                    try:
                        self._add_request(request_id, prompt, params, owner)
                        waiting.add(request_id)
                    except ValueError as error:
                        failed.append(_error_output(request_id, prompt, str(error)))
            yield from failed
            while waiting:
                with self.lock:
                    outputs = [self.output_processor.output_of(g) for g in self._step()
                               if stream and g.owner == owner and not g.finished]
                    outputs += self.output_processor.finals.pop(owner, {}).values()
                for output in outputs:
                    waiting.discard(output.request_id) if output.finished else None
                    yield output
        finally:
            with self.lock:
                for group in [group for group in self.output_processor.groups.values() if group.owner == owner]:
                    self.abort(group.request_id)
                self.output_processor.finals.pop(owner, None)

    def _add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None, owner: int | None):
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if not isinstance(request_id, str):  # the engine's own ids are tuples: a user's can never equal one
            raise ValueError(f"request_id: expected a str, got {type(request_id).__name__}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        with self.lock:
            if request_id in self.output_processor.groups:
                raise ValueError(f"request_id {request_id!r} is already used by an unfinished request")
            # The request's own copy, validated again (the caller may have changed the fields since), with
            # a seed: one drawn from the engine's seed if it brings none, so every run is reproducible.
            params = replace(params, seed=self.rng.getrandbits(31) if params.seed is None else params.seed)
            group = self.output_processor.new_group(request_id, prompt, params, owner)
            try:  # registered first: a request the scheduler has always has its completion
                self.output_processor.register(group)
                for completion in group.completions:
                    self.scheduler.add(completion.request)
            except BaseException:  # Ctrl-C too: nothing of this request stays queued
                for completion in group.completions:
                    if self.scheduler.requests.get(completion.request.request_id) is completion.request:
                        self.scheduler.abort(completion.request.request_id)
                self.output_processor.finish(group, keep=False)
                raise



# ---- OutputProcessor: what the user sees of the requests. -----------------------------------------------------------

class OutputProcessor:
    """Each request of the user as n completions (requests of the scheduler), their text
    (incremental detokenization, stop strings' cuts), logprobs, and the RequestOutputs made of them.
    It reads the scheduler's requests and never changes them: what to stop, it returns to LLM."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer, self.request_ids = tokenizer, itertools.count()
        self.groups: dict[str, RequestGroup] = {}  # unfinished requests of the user, by their id
        self.live: dict[object, Completion] = {}   # their completions, by the scheduler's request id
        # Final outputs not yet in their caller's hands, by the loop that waits for them (None: step()).
        self.finals: dict[int | None, dict[str, RequestOutput]] = {}

    def new_request_id(self) -> str:
        """generate()'s ids: numbers, skipping any that add_request's callers already use."""
        return next(rid for rid in map(str, self.request_ids) if rid not in self.groups)

    def new_group(self, request_id: str, prompt, params: SamplingParams, owner: int | None) -> RequestGroup:
        """A request's prompt as ids, and its n completions as scheduler requests named (request_id, i)
        when n > 1: a name no user's id can take. The first one scores the prompt; each has its own seed."""
        wants_text = self.tokenizer is not None and params.detokenize
        if params.stop and not wants_text:
            raise ValueError("SamplingParams.stop: stop strings are found in the text; this needs a tokenizer "
                             "and detokenize=True (stop_token_ids work on ids)")
        prompt, token_ids = self._tokenize(prompt)
        group = RequestGroup(request_id, prompt, [], [None] if params.prompt_logprobs is not None else None, owner)
        requests = [Request(request_id, token_ids, params)] if params.n == 1 else [
            Request((request_id, i), token_ids, replace(params, n=1, seed=seed_for(params.seed, i),
                                                        prompt_logprobs=None if i else params.prompt_logprobs))
            for i in range(params.n)]
        for index, request in enumerate(requests):
            stream = self.tokenizer.stream(params.skip_special_tokens) if wants_text else None
            logprobs = None if params.logprobs is None else []
            group.completions.append(Completion(request, index, group, stream, logprobs=logprobs))
        return group

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _as_token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("prompt: a dict prompt needs 'prompt_token_ids' or 'prompt'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids "
                                 "(a list of ints or {'prompt_token_ids': [...]})")
            return prompt, self.tokenizer.encode(prompt)
        return None, _as_token_ids(prompt)

    def register(self, group: RequestGroup) -> None:
        """Before the scheduler has any of the group's requests: each one it has always has its completion."""
        for completion in group.completions:
            self.live[completion.request.request_id] = completion
        self.groups[group.request_id] = group

    def add_logprobs(self, flight: "InFlight", tokens: dict[Request, int]) -> None:
        """A step's logprobs, added before update() appends its tokens: an interrupt in between
        leaves an entry too many (trim_after_failure drops it), never one too few."""
        if flight.sampled_logprobs is not None:
            ids, values = (t.tolist() for t in flight.sampled_logprobs)
            for request, row in flight.plan.sample_row.items():
                if request.sampling_params.logprobs is not None and not request.status.is_finished:
                    self.live[request.request_id].logprobs.extend(self._logprob_dict(
                        token, ids[row + i], values[row + i], request.sampling_params)  # a row per draft position
                        for i, token in enumerate(tokens[request]))
        if flight.prompt_logprobs is not None:  # each prompt position's once, by the group's first completion
            ids, values = (t.tolist() for t in flight.prompt_logprobs)
            for row, (request, position) in enumerate(flight.plan.prompt_positions):
                completion = self.live.get(request.request_id)  # (a request aborted meanwhile may have a successor)
                # (a preempted request scores its prompt again: a position recorded already is skipped)
                if completion and completion.request is request and position == len(completion.group.prompt_logprobs):
                    token = request.prompt_token_ids[position]
                    completion.group.prompt_logprobs.append(
                        self._logprob_dict(token, ids[row], values[row], request.sampling_params, prompt=True))

    def find_stop_strings(self, moved: list[Request]) -> list[tuple[Request, str, int]]:
        """After update(): the moved requests whose text now holds a stop string (cut there), with it and
        the number of output tokens that completes it (accepted drafts may have brought more)."""
        return [(request, *hit) for request in moved if request.sampling_params.stop
                and not isinstance(request.stop_reason, str)
                and (hit := self._find_stop_string(self.live[request.request_id])) is not None]

    def trim_after_failure(self) -> list[tuple[Request, str, int]]:
        """After a failed step: each completion's logprobs, text and stop search made whole again;
        the stop strings found in text whose search the failure cut off."""
        stops = []
        for completion in self.live.values():
            request = completion.request
            if completion.logprobs is not None:
                del completion.logprobs[len(request.output_token_ids):]
            if completion.stream is not None and not isinstance(request.stop_reason, str):  # decode text anew
                completion.stream, completion.text, completion.num_decoded = completion.stream.restart(), "", 0
            if request.status is RequestStatus.FINISHED_LENGTH and request.sampling_params.stop:
                if (hit := self._find_stop_string(completion)) is not None:  # its last step may have died first
                    stops.append((request, *hit))
        return stops

    def groups_of(self, requests: list[Request]) -> list[RequestGroup]:
        """The groups these scheduler requests are completions of; each finished one's final output
        is kept in `finals` for its loop (or step()) and the group forgotten."""
        groups = list(dict.fromkeys(self.live[request.request_id].group for request in requests))
        for group in groups:
            if group.finished:
                self.finish(group, keep=True)
        return groups

    def finish(self, group: RequestGroup, keep: bool) -> RequestOutput:
        """A finished group's final output, kept for its caller (`keep`) before the group is forgotten,
        its entry in `groups` last: an interrupt on the way leaves it there, and recovery finishes it."""
        output = self.output_of(group)
        if keep:
            self.finals.setdefault(group.owner, {})[group.request_id] = output
        for completion in group.completions:
            self.live.pop(completion.request.request_id, None)
        self.groups.pop(group.request_id, None)
        return output

    def output_of(self, group: RequestGroup) -> RequestOutput:
        outputs = [self._completion_output(completion) for completion in group.completions]
        first = group.completions[0].request
        error = next((c.request.error for c in group.completions if c.request.error), None)
        prompt_logprobs = None if group.prompt_logprobs is None else list(group.prompt_logprobs)
        return RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, prompt_logprobs, outputs,
                             group.finished, first.num_cached_tokens, error)

    def _logprob_dict(self, token: int, ids: list[int], values: list[float], params: SamplingParams,
                      prompt: bool = False) -> dict[int, Logprob]:
        """The chosen token's logprob and rank (ids[0], values[0]), then the top k; text only with detokenize."""
        k, decode = params.prompt_logprobs if prompt else params.logprobs, params.detokenize
        entries = {token: Logprob(values[0], ids[0], self._decode_one(token) if decode else None)}
        for rank, (top_id, value) in enumerate(zip(ids[1:k + 1], values[1:k + 1]), 1):
            entries.setdefault(top_id, Logprob(value, rank, self._decode_one(top_id) if decode else None))
        return entries

    def _decode_one(self, token: int) -> str | None:
        """A logprob's text: None without a tokenizer, or for an id the tokenizer has no bytes for."""
        with contextlib.suppress(ValueError):
            return self.tokenizer.decode([token]) if self.tokenizer else None
        return None

    def _find_stop_string(self, completion: Completion) -> tuple[str, int] | None:
        """Search the newest text (across tokens) for a stop string, as the scheduler's rule says: cut there. Token
        by token (accepted drafts bring several in a step): the stop string and the output tokens that complete it."""
        request = completion.request
        for num_tokens in range(completion.num_decoded + 1, len(request.output_token_ids) + 1):
            text = self._detokenize(completion, num_tokens)
            if hit := find_stop_string(request.sampling_params, num_tokens, text, completion.num_searched):
                completion.text = text[:hit[0]]
                return hit[1], num_tokens
            completion.num_searched = max(completion.num_searched, len(text))
        return None

    def _completion_output(self, completion: Completion) -> CompletionOutput:
        request, params = completion.request, completion.request.sampling_params
        text = self._detokenize(completion)
        if not request.status.is_finished and params.stop and not params.include_stop_str_in_output:
            # hold back the longest end of the text that may still become a stop string, which would be cut
            held = max((k for stop in params.stop for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            text = text[:len(text) - held]
        # (a stop inside accepted drafts leaves logprobs of tokens it dropped)
        logprobs = None if completion.logprobs is None else completion.logprobs[:len(request.output_token_ids)]
        cumulative = None if logprobs is None else sum(entry[t].logprob for t, entry in zip(request.output_token_ids,
                                                                                             logprobs))
        return CompletionOutput(completion.index, text, list(request.output_token_ids), cumulative, logprobs,
                                request.finish_reason, request.stop_reason)

    def _detokenize(self, completion: Completion, num_tokens: int | None = None) -> str:
        """The output's text so far (its first num_tokens tokens' at most), decoding only the tokens not decoded
        before (O(1) a token). The token that stopped a request and ids the tokenizer has no bytes for (padded
        embedding rows, holes in its vocabulary) have no text; a stop string has fixed the text for good."""
        request = completion.request
        if completion.stream is None or isinstance(request.stop_reason, str):
            return completion.text
        tokens = request.output_token_ids
        last = len(tokens) - (request.status is RequestStatus.FINISHED_STOPPED)
        end = last if num_tokens is None else min(num_tokens, last)
        for token in tokens[completion.num_decoded:end]:
            completion.text += completion.stream.push(token)
        completion.num_decoded = max(end, completion.num_decoded)
        if request.status.is_finished and end == last:
            completion.text += completion.stream.finish()
            completion.stream = None
        return completion.text


# ---- ModelRunner: one step on the device. Every step's integers go to the device in ONE copy. -----------------------

FLOAT_FIELDS = ("temperature", "top_p", "min_p")  # float32 values bit-cast into the int32 buffer
# The buffer's first words, all that tensor-parallel ranks > 0 read of it: what to do (STOP, STEP, LOAD) and a step's
# StepPlan.shape.
STOP, STEP, LOAD, HEADER_SIZE = 0, 1, 2, 7


class InputBuffer:
    """Every integer of a step (floats bit-cast) in ONE int32 buffer at fixed offsets: a pinned host
    buffer is filled and its used prefix copied to the device buffer in one copy. The device-side
    views are static, so a CUDA graph captured on them replays after each step's copy. The block
    table comes last, so a step copies only the prefix that holds its rows."""

    def __init__(self, max_tokens, max_seqs, max_blocks_per_seq, device, pin_memory, max_rows):
        sizes = dict(header=HEADER_SIZE, input_ids=max_tokens, positions=max_tokens, slot_mapping=max_tokens,
                     query_start_loc=max_seqs + 1, seq_lens=max_seqs, logits_indices=max_tokens,
                     temperature=max_rows, top_p=max_rows, top_k=max_rows, min_p=max_rows, seeds=max_rows,
                     placeholder_dst=max_seqs, placeholder_src=max_seqs, block_table=max_seqs * max_blocks_per_seq)
        *starts, size = itertools.accumulate(sizes.values(), initial=0)
        self.offset, self.width = dict(zip(sizes, starts)), max_blocks_per_seq
        self.device = torch.zeros(size, dtype=torch.int32, device=device)
        # Two host buffers: while step N's copy may still be pending, step N+1 fills the other one.
        self.hosts = [torch.zeros(size, dtype=torch.int32, pin_memory=pin_memory) for _ in range(2)]
        self.zeros, self.num_writes = [0] * max_blocks_per_seq, 0  # zeros: padding for block-table rows

    def view(self, name, n, buffer=None):
        view = (self.device if buffer is None else buffer)[self.offset[name]: self.offset[name] + n]
        return view.view(torch.float32) if name in FLOAT_FIELDS else view

    def block_table(self, rows, buffer=None):
        return self.view("block_table", rows * self.width, buffer).view(rows, self.width)

    def write(self, rows, tables, fields):
        """Write every field into the next pinned host buffer, then copy the used prefix once."""
        host = self.hosts[self.num_writes % 2]
        self.num_writes += 1
        for name, values in fields.items():
            if values:
                bits = array("f" if name in FLOAT_FIELDS else "i", values)
                self.view(name, len(values), host).view(torch.int32).copy_(torch.frombuffer(bits, dtype=torch.int32))
        # The block table: only the columns this batch uses are filled; the kernels never read past
        # a request's own blocks, so what earlier steps left in the other columns does no harm.
        used_width, flat = max(map(len, tables)), array("i")
        for table in tables:
            flat.extend(table)
            flat.extend(self.zeros[: used_width - len(table)])
        self.block_table(rows, host)[: len(tables), :used_width].copy_(
            torch.frombuffer(flat, dtype=torch.int32).view(len(tables), used_width))
        used = self.offset["block_table"] + rows * self.width
        self.device[:used].copy_(host[:used], non_blocking=True)

    def fill_placeholders(self, num_tokens: int, count: int, previous_sampled: torch.Tensor) -> None:
        """Write the previous step's sampled tokens, still on the device, into their input positions."""
        dst, src = self.view("placeholder_dst", count).long(), self.view("placeholder_src", count).long()
        self.view("input_ids", num_tokens).index_copy_(0, dst, previous_sampled.index_select(0, src).int())

    def model_inputs(self, num_tokens, num_seqs, max_query_len, max_seq_len, num_logits):
        """Views of the buffer as the model's arguments (static for a given shape, so a graph replays them)."""
        view = self.view
        meta = AttentionMetadata(
            slot_mapping=view("slot_mapping", num_tokens).long(), query_start_loc=view("query_start_loc", num_seqs + 1),
            seq_lens=view("seq_lens", num_seqs), block_table=self.block_table(num_seqs),
            max_query_len=max_query_len, max_seq_len=max_seq_len)
        logits_indices = None if num_logits is None else view("logits_indices", num_logits).long()
        return view("input_ids", num_tokens).long(), view("positions", num_tokens).long(), meta, logits_indices


@dataclass
class StepPlan:
    """The host-side facts about one prepared step that the launch and the collect need."""
    schedule: SchedulerOutput
    num_tokens: int
    num_rows: int               # requests in the batch, padded up to a graph size when one is used
    num_sampling: int           # rows of sampled tokens: one per sampling request, and one per draft
    max_query_len: int
    max_seq_len: int
    sample_row: dict[Request, int]  # each sampling request's (first) row of the sampled tokens (and logprobs)
    sampling: SamplingTensors
    num_logprobs: int | None = None  # top-k logprobs for the sampled tokens (the most any row asks)
    # Prompt logprobs: logits rows after the sampling ones, each (request, prompt position it scores).
    prompt_positions: list[tuple[Request, int]] = field(default_factory=list)
    drafts: dict[Request, list[int]] = field(default_factory=dict)  # the requests with drafts: rows after its first

    @property
    def shape(self) -> tuple[int, ...]:
        """run_model's arguments: all that every rank's forward needs to know of the step."""
        return (self.num_tokens, self.num_rows, self.max_query_len, self.max_seq_len, self.num_sampling,
                self.num_sampling + len(self.prompt_positions))


@dataclass
class InFlight:
    """A launched step whose sampled tokens (and logprobs) may still be on their way to the host."""
    plan: StepPlan
    sampled: torch.Tensor       # [num_sampling] int64 on the device
    sampled_host: torch.Tensor  # pinned host copy
    ready: torch.cuda.Event | None
    sampled_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # logprobs_of's (ints, floats), on the host
    prompt_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None

    def sampled_token_ids(self) -> dict[Request, list[int]]:
        """Wait for the step, then each sampling request's tokens: one, or its accepted drafts and one more."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens, drafts = self.sampled_host.tolist(), self.plan.drafts
        return {request: accept_drafts(tokens, row, drafts[request]) if request in drafts else [tokens[row]]
                for request, row in self.plan.sample_row.items()}


def batch_order(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """The step's rows, shortest context first: attention starts from the last row, so the longest programs
    start first and none runs alone at the end (H100, mixed contexts, batch 256: 92% -> 96.5% of copy)."""
    return sorted(scheduled, key=lambda entry: entry.start + entry.num_new_tokens)


class ModelRunner:
    """Runs steps of a Transformer on its device: execute(schedule) launches one and returns at once."""

    def __init__(self, model: Transformer, config: EngineConfig, tp: "TensorParallel | None" = None):
        self.model, self.config, self.tp = model, config, tp  # tp: rank 0's handle on the other ranks
        self.kv_cache_dtype = model.config.dtype if config.kv_cache_dtype == "auto" else FP8
        self.device = model.rope_cos.device
        self.on_cuda = self.device.type == "cuda"
        self.capture_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.stats = EngineStats()
        # A decode batch padded up to its graph size can hold more tokens than the budget. Sampling rows: one
        # per request, plus one per draft (drafts only while at most disable_by_batch_size requests run).
        spec = config.speculative_config
        max_rows = config.max_num_seqs + (spec and spec.num_speculative_tokens * spec.disable_by_batch_size or 0)
        self.inputs = InputBuffer(max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
                                  cdiv(config.max_model_len, config.block_size), self.device, self.on_cuda, max_rows)
        self.sampled_host = [torch.zeros(max_rows, dtype=torch.int64, pin_memory=self.on_cuda) for _ in range(2)]
        self.graph_sizes = _graph_ladder(config.max_num_seqs) if self.on_cuda and not config.enforce_eager else []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Decodes with up to k drafts each: graphs of their own, whose rows have room for 1 + k tokens.
        self.draft_query_len = 1 + spec.num_speculative_tokens if spec else 0
        self.draft_graph_sizes = [size for size in self.graph_sizes if spec and size <= spec.disable_by_batch_size
                                  and size * self.draft_query_len <= config.max_num_batched_tokens]
        self.draft_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

        c = model.config
        per_block = kv_cache_bytes_per_block(c.num_layers, config.block_size, c.num_kv_heads, c.head_dim,
                                             self.kv_cache_dtype)
        num_blocks = config.num_blocks
        if num_blocks is None:
            # Never more than every sequence at full length can use: more blocks could only keep
            # more finished prefixes cached, and the pool keeps a Python object per block.
            useful = config.max_num_seqs * self.inputs.width
            num_blocks = min(useful, self._profile_num_blocks(per_block) if self.on_cuda
                             else (1 << 30) // per_block)  # CPU: at most 1 GiB of cache
        if c.tp_size > 1:  # the scheduler's blocks are on every rank: as many as the smallest rank holds
            num_blocks = torch.tensor(num_blocks, device=self.device)
            dist.all_reduce(num_blocks, op=dist.ReduceOp.MIN)
            num_blocks = int(num_blocks)
            if tp:
                tp.buffer = self.inputs.device
        check_kv_capacity(num_blocks, config.block_size, config.max_model_len)
        self.num_blocks, self.kv_caches = num_blocks, self._allocate_kv_caches(num_blocks)
        if self.graph_sizes:
            self._capture_graphs()
        for layer in model.layers:  # only now: profiling and capture run on dummy inputs
            layer.calibrate_kv_scale = config.calculate_kv_scales and config.kv_cache_dtype != "auto"

    def execute(self, schedule: SchedulerOutput, previous: InFlight | None) -> InFlight:
        """Launch one step: its inputs, the forward, sampling and the tokens' copy to the host. It
        does not wait for the device. `previous` is the step still in flight, whose sampled tokens
        this step's placeholders read on the device."""
        plan = self.prepare_inputs(schedule, batch_order(schedule.scheduled), previous)
        with self.tp.collectives() if self.tp else contextlib.nullcontext():
            if self.model.config.tp_size > 1:  # the other ranks run this step on their shards (serve)
                dist.broadcast(self.inputs.device, src=0)
            logits = self.run_model(*plan.shape)
        sampling_logits = logits[: plan.num_sampling]
        sampled = sample(sampling_logits, plan.sampling)
        # The same pair of host buffers as its inputs': step N's copy may still be pending while N+1 launches.
        host = self.sampled_host[self.inputs.num_writes % 2][: plan.num_sampling].copy_(sampled, non_blocking=True)
        flight = InFlight(plan, sampled, host, None)
        if plan.num_logprobs is not None:  # only steps that ask for them pay for log_softmax and the copies
            flight.sampled_logprobs = _to_host(logprobs_of(sampling_logits, sampled, plan.num_logprobs), self.on_cuda)
        if plan.prompt_positions:  # each row's target: the prompt token at the position it scores
            targets = to_device([request.prompt_token_ids[p] for request, p in plan.prompt_positions], self.device)
            k = max(request.sampling_params.prompt_logprobs for request, _ in plan.prompt_positions)
            flight.prompt_logprobs = _to_host(logprobs_of(logits[plan.num_sampling:], targets, k), self.on_cuda)
        if self.on_cuda:
            flight.ready = torch.cuda.current_stream().record_event()
        self.stats.steps += 1
        return flight

    def prepare_inputs(self, schedule: SchedulerOutput, rows: list[ScheduledRequest],
                       previous: InFlight | None) -> StepPlan:
        """Lay the step's rows out as one flat batch in a pinned host buffer and copy it to the
        device in one copy (a step with penalties, min_tokens bans or prompt logprobs copies a few
        small tensors more). This runs on the CPU for every step, so it is written for speed: plain
        lists, a short path for decodes (one token each), one array -> tensor conversion per field."""
        block_size = self.config.block_size
        previous_rows = previous.plan.sample_row if previous is not None else {}
        input_ids, positions, slots, query_start, seq_lens, tables = [], [], [], [0], [], []
        placeholder_dst, placeholder_src, logits_indices, samplers = [], [], [], []
        prompt_rows, prompt_positions = [], []
        for entry in rows:
            request, start = entry.request, entry.start
            end = start + entry.num_new_tokens
            known, blocks = request.num_tokens, request.block_ids
            pending = None  # the newest token, sampled by the step still in flight: read on the device
            input_ids += request.all_token_ids[start:min(end, known)]
            if entry.draft_token_ids:  # drafts follow the known tokens; each position gets logits below
                input_ids += entry.draft_token_ids
            elif end > known:
                assert end == known + 1, "only a request's newest token may be a placeholder"
                pending = previous_rows[request]
                placeholder_dst.append(len(input_ids))
                placeholder_src.append(pending)
                input_ids.append(0)
            if end - start == 1:
                positions.append(start)
                slots.append(blocks[start // block_size] * block_size + start % block_size)
            else:
                positions += range(start, end)
                slots += token_slots(blocks, start, end, block_size)
            if request.sampling_params.prompt_logprobs is not None and start < len(request.prompt_token_ids) - 1:
                # Row of position p: the logprob of prompt token p + 1 (up to the prompt's last).
                last = min(end, len(request.prompt_token_ids) - 1)
                prompt_rows += range(len(input_ids) - (end - start), len(input_ids) - (end - last))
                prompt_positions += [(request, p + 1) for p in range(start, last)]
            query_start.append(len(input_ids))
            seq_lens.append(end)
            tables.append(blocks[: cdiv(end, block_size)])
            if entry.samples_token:
                logits_indices += range(len(input_ids) - 1 - len(entry.draft_token_ids), len(input_ids))
                samplers.append((entry, pending))
        num_seqs, max_query_len = len(seq_lens), max(b - a for a, b in zip(query_start, query_start[1:]))
        fields = dict(input_ids=input_ids, positions=positions, slot_mapping=slots, query_start_loc=query_start,
                      seq_lens=seq_lens, logits_indices=logits_indices + prompt_rows,
                      placeholder_dst=placeholder_dst, placeholder_src=placeholder_src)
        sample_fields, sample_row, sampling, num_logprobs = self._sampling_inputs(samplers, previous)
        num_rows = pad_for_graph(fields, num_seqs, *self._graphs_for(max_query_len))
        drafts = {entry.request: entry.draft_token_ids for entry in rows if entry.draft_token_ids}
        plan = StepPlan(schedule, len(fields["input_ids"]), num_rows, len(logits_indices), max_query_len, max(seq_lens),
                        sample_row, sampling, num_logprobs, prompt_positions, drafts)
        self.inputs.write(num_rows, tables, fields | sample_fields | {"header": [STEP, *plan.shape]})
        if placeholder_dst:  # (before a tensor-parallel broadcast: the other ranks get the whole input_ids)
            self.inputs.fill_placeholders(len(fields["input_ids"]), len(placeholder_dst), previous.sampled)
        self.stats.context_tokens_read += sum(seq_lens)
        return plan

    def _sampling_inputs(self, samplers, previous: InFlight | None) -> tuple[dict, dict, SamplingTensors, int | None]:
        """The sampling rows' fields for the buffer, each request's first row, the SamplingTensors that view them
        (plus the penalties' and bans' tensors when a row has some), and the most top-k logprobs a row asks for."""
        vocab_size, fields = self.model.config.vocab_size, dict(temperature=[], top_p=[], top_k=[], min_p=[], seeds=[])
        num_logprobs, adjusted, sample_row = None, [], {}
        for entry, pending in samplers:
            request, params, drafts = entry.request, entry.request.sampling_params, entry.draft_token_ids
            sample_row[request] = len(fields["seeds"])
            if params.logprobs is not None:
                num_logprobs = max(num_logprobs or 0, params.logprobs)
            for i in range(1 + len(drafts)):  # a row per position that samples: each draft's, then one more
                # The noise of the k-th token a request draws depends on (its seed, k) alone.
                index = len(request.output_token_ids) + request.num_output_placeholders + i
                fields["seeds"].append(seed_for(params.seed, index))
                fields["temperature"].append(0.0 if params.is_greedy else params.temperature)
                fields["top_p"].append(params.top_p)
                fields["top_k"].append(params.top_k if 0 < params.top_k < vocab_size else 0)
                fields["min_p"].append(params.min_p)
                if params.has_penalties or entry.banned_token_ids:  # penalties count the drafts before the row
                    penalties = (params.repetition_penalty, params.frequency_penalty, params.presence_penalty)
                    adjusted.append((len(fields["seeds"]) - 1, request.output_token_ids + drafts[:i],
                                     request.prompt_token_ids, penalties if params.has_penalties else None, pending,
                                     entry.banned_token_ids or ()))
        rows, top_p, top_k, min_p = len(fields["seeds"]), fields["top_p"], fields["top_k"], fields["min_p"]
        sampling = SamplingTensors(
            *(self.inputs.view(name, rows) for name in ("temperature", "top_p", "top_k", "seeds")),
            all_greedy=not any(fields["temperature"]), needs_top_k_top_p=any(top_k) or any(p < 1 for p in top_p)
            or any(min_p), min_p=self.inputs.view("min_p", rows) if any(min_p) else None,
            adjust=logits_adjustment(adjusted, rows, vocab_size, previous and previous.sampled, self.device)
            if adjusted else None)
        return fields, sample_row, sampling, num_logprobs

    def _graphs_for(self, max_query_len: int) -> tuple[dict, int]:
        """The graphs that run a batch whose rows have at most max_query_len tokens, and their rows' length:
        decodes (1), and decodes with drafts (1 + k; also short chunks)."""
        if max_query_len == 1:
            return self.graphs, 1
        return (self.draft_graphs, self.draft_query_len) if max_query_len <= self.draft_query_len else ({}, 0)

    def run_model(self, num_tokens, num_rows, max_query_len, max_seq_len, num_sampling, num_logits) -> torch.Tensor:
        """Logits of the sampling rows, then of the prompt-logprobs rows (StepPlan.shape says how many):
        a graph replay for decode-only batches, else eager."""
        calibrating = any(layer.calibrate_kv_scale for layer in self.model.layers)  # graphs do not: run eager
        graphs, query_len = self._graphs_for(max_query_len)
        if num_rows in graphs and num_tokens == num_rows * query_len and not calibrating:
            graph, logits = graphs[num_rows]
            graph.replay()
            self.stats.graph_steps += 1
            if num_logits == num_sampling == num_tokens:
                return logits[:num_logits]
            return logits.index_select(0, self.inputs.view("logits_indices", num_logits).long())
        with torch.inference_mode():
            return self._forward(num_tokens, num_rows, max_query_len, max_seq_len, num_logits)

    def _forward(self, *shape):
        input_ids, positions, meta, logits_indices = self.inputs.model_inputs(*shape)
        return self.model(input_ids, positions, self.kv_caches, meta, logits_indices)

    def _allocate_kv_caches(self, num_blocks: int) -> torch.Tensor:
        c = self.model.config
        return allocate_kv_cache(c.num_layers, num_blocks, self.config.block_size, c.num_kv_heads, c.head_dim,
                                 self.kv_cache_dtype, self.device)

    def _profile_num_blocks(self, bytes_per_block):
        """Run the largest step the engine can schedule through execute(), on dummy requests and a
        scratch cache, and size the KV cache from the memory left at its peak."""
        config = self.config
        num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        per_seq = min(cdiv(config.max_num_batched_tokens, num_seqs), config.max_model_len)
        num_tokens = min(config.max_num_batched_tokens, num_seqs * per_seq)
        params = SamplingParams(top_p=0.5, top_k=5, seed=0)  # the sampler's sorting path: its largest
        entries, blocks_per_seq = [], cdiv(per_seq, config.block_size)
        for i, start in enumerate(range(0, num_tokens, per_seq)):
            request = Request(f"profile-{i}", [0] * min(per_seq, num_tokens - start), params)
            request.block_table.block_ids = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            entries.append(ScheduledRequest(request, 0, request.num_tokens, samples_token=True))
        self.kv_caches = self._allocate_kv_caches(len(entries) * blocks_per_seq)
        step = SchedulerOutput(entries, [], step=0)
        # cuBLAS keeps a workspace per stream (32 MiB on Hopper): one run on the stream the graphs are captured on
        # allocates the one they keep, so the peak below counts it, as it counts the default stream's.
        with torch.cuda.stream(self.capture_stream):
            self.execute(step, None).sampled_token_ids()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # (what that stream cached, the default stream could not reuse)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(step, None).sampled_token_ids()
        peak = torch.cuda.max_memory_allocated(self.device) - self.kv_caches.numel() * self.kv_caches.element_size()
        # A step with logprobs or penalties holds a few more [rows, vocab] fp32 tensors at once.
        peak += self.graph_logits_bytes() + 4 * len(entries) * self.model.config.vocab_size * 4
        del self.kv_caches
        self.stats = EngineStats()
        torch.cuda.empty_cache()
        return num_blocks_from_memory(bytes_per_block, config.gpu_memory_utilization, peak, self.device)

    def graph_logits_bytes(self) -> int:
        """What the decode graphs keep alive after capture (which comes after profiling): each its
        logits, [size, vocab] in the model's dtype."""
        rows = sum(self.graph_sizes) + sum(self.draft_graph_sizes) * self.draft_query_len
        return rows * self.model.config.vocab_size * self.model.config.dtype.itemsize

    def _capture_graphs(self):
        """One CUDA graph per decode batch size of a ladder (and per size of decodes with k drafts each, up to
        disable_by_batch_size); a batch is padded up to the next size.

        Without graphs a small model's decode step costs more in kernel launches than in work."""
        gc.collect()  # an earlier engine's graphs freed by the collector mid-capture would invalidate the capture
        shapes = [(self.graphs, size, 1) for size in self.graph_sizes]
        shapes += [(self.draft_graphs, size, self.draft_query_len) for size in self.draft_graph_sizes]
        pool = None
        with torch.inference_mode():
            # Largest first: smaller graphs reuse its scratch memory.
            for graphs, size, query_len in sorted(shapes, key=lambda shape: -shape[1] * shape[2]):
                self.inputs.view("slot_mapping", size * query_len).fill_(-1)  # capture writes no KV
                self.inputs.view("query_start_loc", size + 1).copy_(torch.arange(size + 1) * query_len)
                self.inputs.view("seq_lens", size).fill_(query_len)

                # _forward builds the inputs inside the capture too: their int32 -> int64 casts must replay.
                args = (size * query_len, size, query_len, self.config.max_model_len, None)
                self._forward(*args)  # compiles the kernels for this shape outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self.capture_stream):
                    logits = self._forward(*args)
                pool, graphs[size] = graph.pool(), (graph, logits)
        self.graphs, self.draft_graphs = dict(sorted(self.graphs.items())), dict(sorted(self.draft_graphs.items()))
        torch.cuda.synchronize()


# ---- Tensor parallelism: rank 0 drives; every rank runs each step's forward on its own shard. ------------------------

RANK0_TIMEOUT = timedelta(minutes=10)  # rank 0's wait in a collective: a worker that hangs is an error after this
WORKER_TIMEOUT = timedelta(days=365)   # a worker waits for rank 0's next step however long rank 0 idles


@dataclass(eq=False)
class TensorParallel:
    """Rank 0's handle on the other ranks: the workers it spawned (none under torchrun), their errors, the step
    buffer they receive. A failure inside a collective ends the group: every later call fails at once."""
    processes: list
    errors: object | None  # (rank, error) of a spawned worker that failed
    buffer: torch.Tensor | None = None
    failure: str | None = None
    closed: bool = False  # (the process group closed is this LLM's: a later LLM's is not, so close() acts once)

    @contextlib.contextmanager
    def collectives(self, atomic: bool = True):
        """Around rank 0's collectives. `atomic`: Ctrl-C waits until all are issued (a rank stopped half-way would pair
        its next broadcast with the others' all-reduce), so a step fails before or after them and is undone."""
        if self.failure is None and not all(process.is_alive() for process in self.processes):
            self.failure = self._worker_error() or "a tensor-parallel worker died"
        if self.failure is not None:
            raise RuntimeError(self.failure)
        interrupts, handler = [], None
        if atomic and threading.current_thread() is threading.main_thread():  # (signals reach the main thread only)
            handler = signal.signal(signal.SIGINT, lambda *args: interrupts.append(args))
        try:
            yield
        except BaseException as error:
            self.failure = self._worker_error() or f"tensor parallelism stopped by {type(error).__name__}: {error}"
            self.close()
            if self.failure.startswith("tensor parallel rank"):
                raise RuntimeError(self.failure) from error
            raise
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
                if interrupts and callable(handler):
                    handler(*interrupts[0])

    def _worker_error(self) -> str | None:
        if self.errors is None or self.errors.empty():
            return None
        return "tensor parallel rank {} failed: {}".format(*self.errors.get())

    def close(self) -> None:
        """Stop the workers (a STOP step; after a failure, or 10 s without exiting, a kill) and leave the group."""
        if self.closed:
            return
        self.closed = True
        if self.failure is None and self.buffer is not None:
            self.buffer[0] = STOP
            with contextlib.suppress(RuntimeError):
                dist.broadcast(self.buffer, src=0)
            for process in self.processes:
                process.join(timeout=10)
        self.failure = self.failure or "this LLM is closed"
        for process in self.processes:
            process.kill()  # (none if it has exited)
            process.join()
        if dist.is_initialized():
            dist.destroy_process_group()


def start_tensor_parallel(model: str, config: EngineConfig) -> TensorParallel | None:
    """tensor_parallel_size > 1: the other ranks, spawned here (gloo on the CPU, NCCL on GPUs); or, under torchrun
    (RANK, WORLD_SIZE set) running this same script, where ranks > 0 serve in here and exit when rank 0 closes."""
    size = config.tensor_parallel_size
    if size == 1:
        return None
    device, _ = resolve_device_and_dtype(config.device, config.dtype)
    if device.type == "cuda" and size > torch.cuda.device_count() and "RANK" not in os.environ:  # (spawned: one host)
        raise ValueError(f"tensor_parallel_size={size}: more than the {torch.cuda.device_count()} visible GPUs")
    shape = shard_config(SHAPES[model] if model in SHAPES else read_config(model), 0, size)  # before any process
    config = replace(config, max_model_len=config.max_model_len or shape.max_position_embeddings)  # (as LLM's)
    if dist.is_initialized():  # its default process group: one tensor-parallel LLM per process at a time
        raise RuntimeError("tensor_parallel_size > 1: this process has a process group already (close() the LLM)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != size:
            raise ValueError(f"tensor_parallel_size={size}: the launcher started {os.environ['WORLD_SIZE']} ranks")
        if (rank := int(os.environ["RANK"])) > 0:
            serve(model, config, rank, backend, "env://")
            sys.exit(0)
        dist.init_process_group(backend, rank=0, world_size=size, timeout=RANK0_TIMEOUT)
        return TensorParallel([], None)
    with socket.socket() as probe:  # a free port for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    context = torch.multiprocessing.get_context("spawn")
    tp = TensorParallel([], context.SimpleQueue())
    for rank in range(1, size):
        tp.processes.append(context.Process(target=serve, args=(model, config, rank, backend, address, tp.errors),
                                            daemon=True))
        tp.processes[-1].start()
    with tp.collectives(atomic=False):
        dist.init_process_group(backend, init_method=address, rank=0, world_size=size, timeout=RANK0_TIMEOUT)
    return tp


def serve(model: str, config: EngineConfig, rank: int, backend: str, address: str, errors=None) -> None:
    """Rank `rank` > 0: join the group, load this rank's shard, run rank 0's steps until it says STOP. A spawned
    worker's error goes to rank 0 (`errors`), then it exits at once: rank 0's collectives with it fail now."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; closing its LLM ends this
    try:
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=config.tensor_parallel_size,
                                timeout=WORKER_TIMEOUT)
        runner = ModelRunner(_load(model, config, rank)[0], config)
        command = None
        while command != STOP:
            dist.broadcast(runner.inputs.device, src=0)  # rank 0's next message
            command, *shape = runner.inputs.view("header", HEADER_SIZE).tolist()
            if command == STEP:  # its logits are rank 0's to sample
                runner.run_model(*shape)
            elif command == LOAD:
                with contextlib.suppress(ValueError):  # bad tensors: rank 0 raises the same error to the caller
                    load_tensors(runner.model, share_weights(None, runner), "load_weights")
        dist.destroy_process_group()
    except BaseException as error:
        if errors is None:
            raise
        errors.put((rank, f"{type(error).__name__}: {error}"))
        os._exit(1)


def share_weights(weights, runner: ModelRunner):
    """load_weights under tensor parallelism: rank 0's `weights` (None on the other ranks), on the CPU and
    pickled (not a per-step path), on every rank; each then loads its part of them."""
    if weights is not None:
        weights = [(pair[0], pair[1].cpu()) if isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(
            pair[1], torch.Tensor) else pair for pair in (weights.items() if isinstance(weights, Mapping) else weights)]
        runner.inputs.view("header", 1).fill_(LOAD)
        dist.broadcast(runner.inputs.device, src=0)
    shared = [weights]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _load(model: str, config: EngineConfig, rank: int = 0) -> tuple[Transformer, Tokenizer | None]:
    """The network (rank `rank`'s shard) on its device (random weights of a named shape, or a checkpoint's) and
    its tokenizer. With tensor parallelism each rank has a GPU of its own: its rank's, or torchrun's LOCAL_RANK."""
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    size = config.tensor_parallel_size
    if device.type == "cuda":  # streams, events and graphs use the current device: make it ours
        index = torch.cuda.current_device() if device.index is None else device.index
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) if size > 1 else index)
        torch.cuda.set_device(device)
    if model in SHAPES:
        return random_model(model, dtype, device, seed=config.seed, rank=rank, size=size), None
    network, tokenizer = load_model(model, dtype, device, rank, size), None
    if rank > 0:
        return network, None
    try:  # a checkpoint without tokenizer files still runs, on token-id prompts only: say so at load time
        tokenizer = load_tokenizer(model)
    except FileNotFoundError as missing:
        warnings.warn(f"{missing}: prompts must be token ids, and outputs will have no text", stacklevel=3)
    try:  # the defaults every generate() without SamplingParams uses: a bad one is the file's fault
        SamplingParams(**network.config.sampling_defaults)
    except ValueError as error:
        raise ValueError(f"{model}/generation_config.json: a bad sampling default: {error}") from None
    return network, tokenizer


def _as_conversations(messages) -> list:
    """chat()'s one conversation (a list of message dicts) or list of them; a string or a lone dict is a
    ValueError, not a guess (vLLM's chat takes neither)."""
    if not (isinstance(messages, (list, tuple)) and messages and (all(isinstance(m, dict) for m in messages)
                                                                 or all(isinstance(c, list) for c in messages))):
        raise ValueError("chat: messages must be a conversation (a list of {'role', 'content'} dicts) or a list "
                         f"of conversations, got {type(messages).__name__} {str(messages)[:40]}")
    return [messages] if isinstance(messages[0], dict) else messages


def pad_for_graph(fields: dict[str, list], num_seqs: int, graphs: dict, query_len: int) -> int:
    """A batch runs the graph of the next size up, whose rows have room for query_len tokens each: padding
    rows (up to query_len tokens each, seq_len 0) read no key, padding tokens write none, and the tokens
    left after the last padding row belong to no row (attention leaves them alone)."""
    num_tokens = len(fields["input_ids"])
    rows = next((size for size in graphs if size >= num_seqs and size * query_len >= num_tokens), None)
    if rows is None:
        return num_seqs
    for name, fill in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1)):
        fields[name] += [fill] * (rows * query_len - num_tokens)
    fields["seq_lens"] += [0] * (rows - num_seqs)
    ends = (num_tokens + i * query_len for i in range(1, rows - num_seqs + 1))
    fields["query_start_loc"] += [min(end, rows * query_len) for end in ends]
    return rows


def _to_host(pair: tuple[torch.Tensor, torch.Tensor], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=True) for t in pair)


def _graph_ladder(max_num_seqs):
    """Decode batch sizes with a CUDA graph: 1, 2, 4, then every multiple of 8 (padding wastes < 8 rows)."""
    return sorted({size for size in (1, 2, 4, *range(8, max_num_seqs + 1, 8), max_num_seqs) if size <= max_num_seqs})


def _as_token_ids(ids) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"prompt: expected a string, a list of token ids or a dict, got {type(ids).__name__} "
                         f"{str(ids)[:40]}")
    return list(ids)


def _prompts_with_params(prompts, sampling_params) -> list[tuple]:
    """(prompt, its SamplingParams or None) pairs, from one prompt (a string, a list of ids, a dict) or a list of
    them, and one sampling_params for all prompts or one each."""
    many = isinstance(prompts, (list, tuple))
    if not many and not isinstance(prompts, (str, dict)):
        raise ValueError(f"prompts: expected a prompt (a string, a list of token ids or a dict) or a list of "
                         f"prompts, got {type(prompts).__name__}")
    if not many or prompts and all(isinstance(p, int) for p in prompts):  # one prompt
        prompts = [prompts]
    one_each = isinstance(sampling_params, (list, tuple))
    params_list = list(sampling_params) if one_each else [sampling_params] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
    return list(zip(prompts, params_list))


def _error_output(request_id, prompt, message) -> RequestOutput:
    """A request refused when added: what it was given (its text, its ids where they are ids) and why."""
    text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else prompt
    ids = list(ids) if isinstance(ids, (list, tuple)) and all(isinstance(i, int) for i in ids) else []
    return RequestOutput(request_id, text, ids, None, [CompletionOutput(0, "", [], None, None, "error")], True, 0,
                         message)


def _delta(output: RequestOutput, previous: RequestOutput | None) -> RequestOutput:
    """What `output` adds to `previous`, an earlier output of the same request (None: nothing sent)."""
    if previous is None:
        return output
    prompt = output.prompt_logprobs and output.prompt_logprobs[len(previous.prompt_logprobs):] or None
    return replace(output, prompt_logprobs=prompt, outputs=[
        replace(now, text=now.text[len(then.text):], token_ids=now.token_ids[len(then.token_ids):],
                logprobs=None if now.logprobs is None else now.logprobs[len(then.logprobs):])
        for now, then in zip(output.outputs, previous.outputs)])


def _progress(outputs, order: list[str], stats: EngineStats, enabled: bool):
    """`outputs`, final ones of the requests in `order`, passed on with a one-line progress report on a terminal:
    requests done, output tokens/s."""
    first_tokens, start, last = stats.output_tokens, time.perf_counter(), 0.0
    for done, output in enumerate(outputs, 1):
        now = time.perf_counter()
        if enabled and (now - last > 0.1 or done == len(order)):
            last, rate = now, (stats.output_tokens - first_tokens) / max(now - start, 1e-9)
            sys.stderr.write(f"\rProcessed {done}/{len(order)} requests | {rate:,.0f} output tok/s"
                             + "\n" * (done == len(order)))
        yield output

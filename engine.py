"""The engine: the public API (LLM) and the device side of one step (ModelRunner).

The idea (vLLM V1): each step the scheduler hands a token budget to requests; the runner lays the
scheduled tokens of every request out as ONE flat batch (prefill chunks and decodes mixed), runs
the model once and samples a token for each request that reached the end of its known tokens; the
scheduler takes the tokens back. A request's path: LLM.generate -> add_request -> _step ->
ModelRunner.execute (prepare_inputs, run_model, sample) -> LLM._collect -> OutputProcessor.process_step.

LLM owns the requests and the async loop; OutputProcessor what the user sees (n completions,
text, stop strings, logprobs); ModelRunner the device: the step's inputs and their one copy, the
forward (CUDA graphs for decode-only batches), sampling (a Gumbel-max Triton kernel beside its
torch reference) and KV-cache sizing: what every tensor-parallel rank would run. Never touches:
model internals, kernel internals, block bookkeeping.
"""
import contextlib
import functools
import gc
import itertools
import random
import sys
import time
import warnings
from array import array
from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

from attention import FP8, AttentionMetadata, token_slots
from kv_cache import allocate_kv_cache, check_kv_capacity, kv_cache_bytes_per_block, num_blocks_from_memory
from model import (SHAPES, Tokenizer, TokenStream, Transformer, load_model, load_tensors, load_tokenizer, random_model,
                   resolve_device_and_dtype)
from scheduler import (Request, RequestStatus, SamplingParams, ScheduledRequest, Scheduler, SchedulerOutput,
                       check_fields, int_at_least, is_int, number_in)

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


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


@dataclass
class EngineStats:  # counters for bench.py: what each step had to read from memory
    steps: int = 0
    graph_steps: int = 0
    output_tokens: int = 0
    context_tokens_read: int = 0  # sum over steps of every scheduled request's context length


# ---- LLM: requests in, outputs out. ---------------------------------------------------------------------------------

class LLM:
    def __init__(self, model: str, *, dtype=None, device=None, block_size: int = 16, max_num_batched_tokens: int = 8192,
                 max_num_seqs: int = 256, max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, async_scheduling: bool = True, enforce_eager: bool = False,
                 seed: int = 0, num_blocks: int | None = None, long_prefill_token_threshold: int = 0,
                 kv_cache_dtype: str = "auto", calculate_kv_scales: bool = False):
        _check_engine_args(locals())  # every argument as the user passed it
        device, dtype = resolve_device_and_dtype(device, dtype)
        if device.type == "cuda":  # streams, events and graphs use the current device: make it ours
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)
        if model in SHAPES:  # random weights of a named shape: no tokenizer, prompts are ids
            network, self.tokenizer = random_model(model, dtype, device, seed=seed), None
        else:
            network, self.tokenizer = load_model(model, dtype, device), None
            try:  # a checkpoint without tokenizer files still runs, on token-id prompts only: say so at load time
                self.tokenizer = load_tokenizer(model)
            except FileNotFoundError as missing:
                warnings.warn(f"{missing}: prompts must be token ids, and outputs will have no text", stacklevel=2)
        config = network.config
        max_model_len = config.max_position_embeddings if max_model_len is None else max_model_len
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len}: must be at most {config.max_position_embeddings} "
                             "(the model's max_position_embeddings)")
        # Generation stops on the model's EOS ids (generation_config.json) and the tokenizer's.
        eos = list(dict.fromkeys([*config.eos_token_ids, *(self.tokenizer.eos_token_ids if self.tokenizer else [])]))
        self.runner = ModelRunner(network, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                                  max_num_seqs=max_num_seqs, max_model_len=max_model_len, num_blocks=num_blocks,
                                  gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                  eos_token_ids=eos, kv_cache_dtype=config.dtype if kv_cache_dtype == "auto" else FP8,
                                  calculate_kv_scales=calculate_kv_scales and kv_cache_dtype != "auto")
        self.scheduler = Scheduler(num_blocks=self.runner.num_blocks, enable_prefix_caching=enable_prefix_caching,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                   block_size=block_size, vocab_size=config.vocab_size, eos_token_ids=eos,
                                   max_num_seqs=max_num_seqs, long_prefill_token_threshold=long_prefill_token_threshold)
        self.async_scheduling, self.stats = async_scheduling, self.runner.stats
        self.rng = random.Random(seed)  # seeds of requests that bring none
        self.in_flight: InFlight | None = None
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self.undelivered: list[RequestOutput] = []  # final outputs that step() has not returned yet
        self.request_ids = itertools.count()

    # ---- public API ---------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion (default sampling_params: the checkpoint's); outputs in input
        order. A bad prompt fails alone (finish_reason "error", `error` says why). Requests added
        with add_request() share the batches, but generate() returns once its own are done; the next
        step() returns what they produced. If it raises (Ctrl-C too), its own requests are aborted."""
        order, results = self._add_prompts(prompts, sampling_params)
        progress = _Progress(len(order), self.stats, enabled=use_tqdm and sys.stderr.isatty())
        with contextlib.closing(self._run_until_done([r for r in order if r not in results], False)) as outputs:
            for output in outputs:  # final outputs only
                results[output.request_id] = output
                progress.update(len(results))
        return [results[request_id] for request_id in order]

    def stream(self, prompts, sampling_params=None):
        """generate() as it happens: yields RequestOutputs carrying only what is new since the same request's
        last one (token ids, text, logprobs, prompt logprobs), requests interleaved in the order their tokens
        come; each request's last one has finished=True. Text comes in whole characters, held back while it
        may still become a stop string. Closing it early (close(), break) aborts the requests still running."""
        ids, bad = self._add_prompts(prompts, sampling_params)
        sent = {}  # request id -> its last output, as the engine reported it (cumulative)
        with contextlib.closing(self._run_until_done([r for r in ids if r not in bad], True, bad.values())) as outputs:
            for output in outputs:
                yield _delta(output, sent.get(output.request_id))
                sent[output.request_id] = output

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None, *, continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """generate() on one conversation (a list of {"role", "content"} dicts) or a list of them, rendered
        by chat_prompt(). A string or a lone dict is a ValueError, not a guess (vLLM's chat takes neither)."""
        is_list = isinstance(messages, (list, tuple)) and len(messages) > 0
        if not (is_list and (all(isinstance(m, dict) for m in messages) or all(isinstance(c, list) for c in messages))):
            raise ValueError("chat: messages must be a conversation (a list of {'role', 'content'} dicts) or a list "
                             f"of conversations, got {type(messages).__name__} {str(messages)[:40]}")
        options = dict(add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools,
                       continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
        conversations = [messages] if isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt(c, **options) for c in conversations], sampling_params, use_tqdm)

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
        """Queue one request (its n completions). Raises ValueError naming what is wrong with it."""
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        if request_id in self.output_processor.groups:
            raise ValueError(f"request_id {request_id!r} is already used by an unfinished request")
        # The request's own copy, validated again (the caller may have changed the fields since), with
        # a seed: one drawn from the engine's seed if it brings none, so every run is reproducible.
        params = replace(params, seed=self.rng.getrandbits(31) if params.seed is None else params.seed)
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise ValueError("SamplingParams.stop: stop strings are found in the text; this needs a tokenizer "
                             "and detokenize=True (stop_token_ids work on ids)")
        text, token_ids = self._tokenize(prompt)
        self.output_processor.add_request(request_id, text, token_ids, params)

    def step(self) -> list[RequestOutput]:
        """One step: the outputs of requests that moved or finished (and of those generate() passed)."""
        outputs, self.undelivered = self.undelivered + self._step(report_running=True), []
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request (all its completions) now and free its blocks; its final output, or None if
        it had already ended."""
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.in_flight is not None or bool(self.undelivered)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation_config.json sampling fields, else vLLM's defaults."""
        return SamplingParams(**self.runner.model.config.sampling_defaults)

    def load_weights(self, weights) -> None:
        """Update weights in place from (Hugging Face name, tensor) pairs, through the same name
        mapping as loading (fused q/k/v and gate/up slices, tied embeddings): for RL loops. The
        prefix cache is reset (its K/V came from the old weights); CUDA graphs read the same tensors."""
        if self.has_unfinished_requests():
            raise RuntimeError("load_weights: requests are still running; finish or abort them first")
        try:
            load_tensors(self.runner.model, weights, "load_weights")
        finally:  # even a load that failed half-way has changed weights
            self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: no later request reuses a block computed before now."""
        self.scheduler.kv_cache_manager.forget_cached_blocks()

    # ---- the step loop ------------------------------------------------------------------------

    def _step(self, report_running: bool) -> list[RequestOutput]:
        try:
            outputs = self._step_or_raise(report_running)
            self.output_processor.forget(outputs)  # only now: an interrupt before leaves them to recovery
            return outputs
        except BaseException:  # Ctrl-C too: an interrupted step is undone like a failed one
            self._recover()
            raise

    def _step_or_raise(self, report_running: bool) -> list[RequestOutput]:
        """With async scheduling this launches step N+1 *before* waiting for step N's tokens, so the
        CPU's scheduling and input building hide behind the GPU's forward pass."""
        schedule = self.scheduler.schedule()
        launched = self.runner.execute(schedule, self.in_flight) if schedule.scheduled else None
        outputs = self.output_processor.outputs_of(schedule.finished)
        collect, self.in_flight = (self.in_flight, launched) if self.async_scheduling else (launched, None)
        if collect is not None:
            outputs += self._collect(collect, report_running)
        if launched is collect is None and not schedule.finished and self.scheduler.has_unfinished_requests():
            raise RuntimeError("the scheduler made no progress with requests waiting: this is a bug")
        return outputs

    def _recover(self) -> None:
        """After a failed or interrupted step: drop the steps in flight, let the scheduler undo
        every unfinished step (their requests recompute, their cached blocks are forgotten), and
        keep the final outputs of requests that finished before the failure for step()."""
        self.in_flight = None
        if self.runner.on_cuda:  # dropped steps may still read the host buffers: let them finish first
            with contextlib.suppress(RuntimeError):  # a device in an error state: the first error is the one to see
                torch.cuda.synchronize(self.runner.device)
        self.scheduler.recover()
        self.undelivered += self.output_processor.forget(self.output_processor.trim_after_failure())

    def _collect(self, flight: "InFlight", report_running: bool) -> list[RequestOutput]:
        """Wait for a step's tokens, hand them to the scheduler, report who moved."""
        tokens = flight.sampled_token_ids()
        requests = [entry.request for entry in flight.plan.schedule.scheduled if entry.samples_token]
        lengths = [len(request.output_token_ids) for request in requests]
        self.output_processor.add_logprobs(flight, requests, tokens)
        finished = self.scheduler.update(flight.plan.schedule, tokens)
        moved = [request for request, n in zip(requests, lengths) if len(request.output_token_ids) > n]
        self.stats.output_tokens += len(moved)
        return self.output_processor.process_step(moved, finished, report_running)

    def _add_prompts(self, prompts, sampling_params) -> tuple[list[str], dict[str, RequestOutput]]:
        """Queue each prompt under a new id: (the ids in order, the error outputs of those that failed)."""
        prompts = _as_prompt_list(prompts)
        is_list = isinstance(sampling_params, (list, tuple))
        params_list = list(sampling_params) if is_list else [sampling_params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        order, failed = [], {}
        try:
            for prompt, params in zip(prompts, params_list):
                order.append(request_id := self._new_request_id())
                try:
                    self.add_request(request_id, prompt, params)
                except ValueError as error:
                    failed[request_id] = _error_output(request_id, prompt, str(error))
        except BaseException:  # Ctrl-C while queueing: none of them stays queued
            for request_id in order:
                self.abort(request_id)
            raise
        return order, failed

    def _run_until_done(self, request_ids: list[str], report_running: bool, first=()):
        """Yield `first`, then step until these requests finish, yielding their outputs (as they move, or the final
        ones); others' final outputs wait for step(). If anything raises or the reader stops, the rest are aborted."""
        last = {r: self.output_processor.group_output(self.output_processor.groups[r]) for r in request_ids}
        try:
            yield from first
            # Once nothing else runs, one more step collects the step in flight: the engine ends idle.
            while last or (self.in_flight is not None and not self.scheduler.has_unfinished_requests()):
                outputs = self._step(report_running)  # others' final outputs: kept for step() before any yield
                self.undelivered += [o for o in outputs if o.finished and o.request_id not in last]
                for output in [o for o in outputs if o.request_id in last]:
                    last[output.request_id] = output
                    yield last.pop(output.request_id) if output.finished else output
                # only a stream's reader runs code between yields, so only it ends one elsewhere (abort, generate())
                for request_id in [r for r in last if r not in self.output_processor.groups] if report_running else []:
                    taken = [o for o in self.undelivered if o.request_id == request_id]
                    self.undelivered = [o for o in self.undelivered if o.request_id != request_id]
                    output = last.pop(request_id)
                    yield taken[0] if taken else replace(output, finished=True, outputs=[
                        replace(c, finish_reason=c.finish_reason or "abort") for c in output.outputs])
        finally:  # an exception, Ctrl-C, or a caller that stopped reading: never leave blocks nobody will read
            for request_id in last:
                self.abort(request_id)
            self.undelivered = [output for output in self.undelivered if output.request_id not in request_ids]

    def _new_request_id(self) -> str:
        """generate()'s ids: numbers, skipping any that add_request's callers already use."""
        return next(rid for rid in map(str, self.request_ids) if rid not in self.output_processor.groups)

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


# ---- OutputProcessor: what the user sees of the requests. -----------------------------------------------------------

class OutputProcessor:
    """Each request of the user as n completions (requests of the scheduler), their text
    (incremental detokenization, stop strings), logprobs, and the RequestOutputs made of them. It
    stops a request in the scheduler when a stop string appears; it never touches the device."""

    def __init__(self, tokenizer: Tokenizer | None, scheduler: Scheduler):
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.groups: dict[str, RequestGroup] = {}  # unfinished requests of the user, by their id
        self.live: dict[str, Completion] = {}      # their completions, by the scheduler's request id

    def add_request(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams) -> None:
        """Queue its n completions in the scheduler; on an error, none."""
        group = RequestGroup(request_id, prompt, [], [None] if params.prompt_logprobs is not None else None)
        requests = [Request(request_id, token_ids, params)] if params.n == 1 else [  # the first scores the prompt
            Request(f"{i}_{request_id}", token_ids, replace(params, n=1, seed=_seed_for(params.seed, i),
                                                            prompt_logprobs=None if i else params.prompt_logprobs))
            for i in range(params.n)]
        try:
            for index, request in enumerate(requests):
                self.scheduler.add(request)
                wants_text = self.tokenizer is not None and params.detokenize
                stream = self.tokenizer.stream(params.skip_special_tokens) if wants_text else None
                self.live[request.request_id] = completion = Completion(
                    request, index, group, stream, logprobs=None if params.logprobs is None else [])
                group.completions.append(completion)
        except BaseException:  # Ctrl-C too: nothing of this request stays queued
            for request in requests:
                if self.scheduler.requests.get(request.request_id) is request:
                    self.scheduler.abort(request.request_id)
                if request.request_id in self.live and self.live[request.request_id].request is request:
                    del self.live[request.request_id]
            raise
        self.groups[request_id] = group

    def abort(self, request_id: str) -> RequestOutput | None:
        if (group := self.groups.get(request_id)) is None:
            return None
        for completion in group.completions:
            if not completion.request.status.is_finished:
                self.scheduler.abort(completion.request.request_id)
        return self.forget([self.group_output(group)])[0]

    def add_logprobs(self, flight: "InFlight", requests: list[Request], tokens: list[int]) -> None:
        """A step's logprobs, added before update() appends its tokens: an interrupt in between
        leaves an entry too many (trim_after_failure drops it), never one too few."""
        logprobs = [(ints.tolist(), floats.tolist()) for ints, floats in flight.logprobs_host]
        if flight.plan.num_logprobs is not None:
            ids, values = logprobs.pop(0)
            for row, (request, token) in enumerate(zip(requests, tokens)):
                if request.sampling_params.logprobs is not None and not request.status.is_finished:
                    self.live[request.request_id].logprobs.append(
                        self._logprob_dict(token, ids[row], values[row], request.sampling_params.logprobs))
        if logprobs:
            self._add_prompt_logprobs(flight.plan.prompt_positions, *logprobs[0])

    def trim_after_failure(self) -> list[RequestOutput]:
        """After a failed step: each completion's logprobs, text and stop search made whole again."""
        for completion in self.live.values():
            request = completion.request
            if completion.logprobs is not None:
                del completion.logprobs[len(request.output_token_ids):]
            if completion.stream is not None and not isinstance(request.stop_reason, str):  # decode text anew
                completion.stream, completion.text, completion.num_decoded = completion.stream.restart(), "", 0
            if request.status is RequestStatus.FINISHED_LENGTH and request.sampling_params.stop:
                self._found_stop_string(completion)  # its last step may have died before the search
        done = [group for group in self.groups.values() if all(c.request.status.is_finished for c in group.completions)]
        return [self.group_output(group) for group in done]

    def process_step(self, moved: list[Request], finished: list[Request], report_running: bool) -> list[RequestOutput]:
        """After update(): stop strings in the moved requests' text; outputs (all, or the finished)."""
        for request in moved:  # stop strings are found in the text as it grows, token by token
            if request.sampling_params.stop and request.status is not RequestStatus.FINISHED_STOPPED:
                was_finished = request.status.is_finished  # by length: a stop string still cuts its text
                if self._found_stop_string(self.live[request.request_id]) and not was_finished:
                    finished.append(request)
        if report_running:
            return self.outputs_of(moved + finished)
        return [output for output in self.outputs_of(finished) if output.finished]  # n > 1: all of them

    def _logprob_dict(self, token: int, ids: list[int], values: list[float], k: int) -> dict[int, Logprob]:
        """The chosen token's logprob and rank (ids[0], values[0]), then the top k."""
        entries = {token: Logprob(values[0], ids[0], self._decode_one(token))}
        for rank, (top_id, value) in enumerate(zip(ids[1:k + 1], values[1:k + 1]), 1):
            entries.setdefault(top_id, Logprob(value, rank, self._decode_one(top_id)))
        return entries

    def _add_prompt_logprobs(self, positions, ids, values) -> None:
        """Each prompt position's logprobs once, recorded by the group's first completion (a
        preempted request computes its prompt again: what is recorded already is skipped)."""
        for row, (request, position) in enumerate(positions):
            completion = self.live.get(request.request_id)  # (a request aborted meanwhile may have a successor)
            if completion and completion.request is request and position == len(completion.group.prompt_logprobs):
                completion.group.prompt_logprobs.append(self._logprob_dict(
                    request.prompt_token_ids[position], ids[row], values[row], request.sampling_params.prompt_logprobs))

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer and token < self.tokenizer.vocab_size else None

    def _found_stop_string(self, completion: Completion) -> bool:
        """Past min_tokens, search the newest text (across tokens) for a stop string: cut there, stop."""
        request, params = completion.request, completion.request.sampling_params
        text = self._detokenize(completion)
        if len(request.output_token_ids) > params.min_tokens:
            # a stop string ending in text not searched yet (vLLM's rule: past min_tokens, an older one stays)
            if hits := [(at, stop) for stop in params.stop
                        if (at := text.find(stop, max(0, completion.num_searched - len(stop) + 1))) >= 0]:
                at, stop = min(hits)
                completion.text = text[:at + len(stop) if params.include_stop_str_in_output else at]
                request.stop_reason = stop
                if request.status.is_finished:
                    request.status = RequestStatus.FINISHED_STOPPED
                else:
                    self.scheduler.abort(request.request_id, RequestStatus.FINISHED_STOPPED)
                return True
        completion.num_searched = len(text)
        return False

    def outputs_of(self, requests: list[Request]) -> list[RequestOutput]:
        """The outputs of the requests these scheduler requests are completions of."""
        groups = dict.fromkeys(self.live[request.request_id].group for request in requests)
        return [self.group_output(group) for group in groups]

    def forget(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Forget the requests whose final outputs these are, once they are on their way to the user."""
        for output in outputs:
            if output.finished and (group := self.groups.get(output.request_id)) is not None:
                for completion in group.completions:
                    self.live.pop(completion.request.request_id, None)
                del self.groups[output.request_id]  # last: an interrupt before leaves it to recovery
        return outputs

    def group_output(self, group: RequestGroup) -> RequestOutput:
        finished = all(completion.request.status.is_finished for completion in group.completions)
        outputs = [self._completion_output(completion) for completion in group.completions]
        first = group.completions[0].request
        error = next((c.request.error for c in group.completions if c.request.error), None)
        prompt_logprobs = None if group.prompt_logprobs is None else list(group.prompt_logprobs)
        return RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, prompt_logprobs, outputs,
                             finished, first.num_cached_tokens, error)

    def _completion_output(self, completion: Completion) -> CompletionOutput:
        request, params = completion.request, completion.request.sampling_params
        text = self._detokenize(completion)
        if not request.status.is_finished and params.stop and not params.include_stop_str_in_output:
            # hold back what may still become a stop string, which would be cut
            text = text[:len(text) - _stop_string_prefix(text, params.stop)]
        logprobs = None if completion.logprobs is None else list(completion.logprobs)
        cumulative = None if logprobs is None else sum(entry[t].logprob for t, entry in zip(request.output_token_ids,
                                                                                             logprobs))
        return CompletionOutput(completion.index, text, list(request.output_token_ids), cumulative, logprobs,
                                request.finish_reason, request.stop_reason)

    def _detokenize(self, completion: Completion) -> str:
        """The output's text so far, decoding only the tokens not decoded before (O(1) a token). The
        token that stopped a request and ids past the tokenizer's vocabulary (padded embedding rows)
        have no text; a stop string has fixed the text for good."""
        request = completion.request
        if completion.stream is None or isinstance(request.stop_reason, str):
            return completion.text
        tokens = request.output_token_ids
        end = len(tokens) - (request.status is RequestStatus.FINISHED_STOPPED)
        for token in tokens[completion.num_decoded:end]:
            if token < self.tokenizer.vocab_size:
                completion.text += completion.stream.push(token)
        completion.num_decoded = max(end, completion.num_decoded)
        if request.status.is_finished:
            completion.text += completion.stream.finish()
            completion.stream = None
        return completion.text


# ---- ModelRunner: one step on the device. Every step's integers go to the device in ONE copy. -----------------------

class InputLayout:
    """Fixed offsets of each field in one int32 buffer (floats bit-cast): the device-side views are
    static, so a CUDA graph captured on them replays after each step's copy. The block table comes
    last, so a step copies only the prefix that holds its rows."""

    def __init__(self, max_tokens, max_seqs, max_blocks_per_seq):
        sizes = dict(input_ids=max_tokens, positions=max_tokens, slot_mapping=max_tokens,
                     query_start_loc=max_seqs + 1, seq_lens=max_seqs, logits_indices=max_tokens,
                     temperature=max_seqs, top_p=max_seqs, top_k=max_seqs, min_p=max_seqs, seeds=max_seqs,
                     placeholder_dst=max_seqs, placeholder_src=max_seqs)
        *starts, self.block_table = itertools.accumulate(sizes.values(), initial=0)
        self.offset = dict(zip(sizes, starts))
        self.width, self.size = max_blocks_per_seq, self.block_table + max_seqs * max_blocks_per_seq

    def view(self, buffer, name, n):
        return buffer[self.offset[name]: self.offset[name] + n]

    def block_table_view(self, buffer, rows):
        return buffer[self.block_table: self.block_table + rows * self.width].view(rows, self.width)


@dataclass
class StepPlan:
    """The host-side facts about one prepared step that the launch and the collect need."""
    schedule: SchedulerOutput
    num_tokens: int
    num_rows: int               # requests in the batch, padded up to a graph size when one is used
    num_sampling: int
    max_query_len: int
    max_seq_len: int
    sample_row: dict[str, int]  # request_id -> row of this step's sampled tokens
    sampling: "SamplingTensors"
    num_logprobs: int | None = None  # top-k logprobs for the sampled tokens (the most any row asks)
    # Prompt logprobs: logits rows after the sampling ones, each (request, prompt position it scores).
    prompt_positions: list[tuple[Request, int]] = field(default_factory=list)
    prompt_targets: torch.Tensor | None = None
    num_prompt_logprobs: int = 0


@dataclass
class InFlight:
    """A launched step whose sampled tokens (and logprobs) may still be on their way to the host."""
    plan: StepPlan
    sampled: torch.Tensor       # [num_sampling] int64 on the device
    sampled_host: torch.Tensor  # pinned host copy
    ready: torch.cuda.Event | None
    logprobs_host: list[tuple[torch.Tensor, torch.Tensor]]  # logprobs_of's (ints, floats): sampled, prompt

    def sampled_token_ids(self) -> list[int]:
        """Wait for the step, then its tokens (one per scheduled entry that samples, in order)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.sampled_host.tolist()


class ModelRunner:
    """Runs steps of a Transformer on its device: execute(schedule) launches one and returns at once."""

    def __init__(self, model: Transformer, *, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, gpu_memory_utilization: float, num_blocks: int | None, enforce_eager: bool,
                 eos_token_ids: list[int], kv_cache_dtype: torch.dtype, calculate_kv_scales: bool = False):
        self.model, config, self.kv_cache_dtype = model, model.config, kv_cache_dtype
        self.eos_token_ids = eos_token_ids  # banned until a request's min_tokens
        self.device = model.rope_cos.device
        self.on_cuda = self.device.type == "cuda"
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.stats = EngineStats()
        # A decode batch padded up to its graph size can hold more tokens than the budget.
        self.layout = InputLayout(max(max_num_batched_tokens, max_num_seqs), max_num_seqs,
                                  -(-max_model_len // block_size))
        self.device_buffer = torch.zeros(self.layout.size, dtype=torch.int32, device=self.device)
        # Two host buffers: while step N's copy may still be pending, step N+1 fills the other one.
        self.host_buffers = [torch.zeros(self.layout.size, dtype=torch.int32, pin_memory=self.on_cuda)
                             for _ in range(2)]
        self.zeros = [0] * self.layout.width  # padding for block-table rows
        self.sampled_host = [torch.zeros(max_num_seqs, dtype=torch.int64, pin_memory=self.on_cuda) for _ in range(2)]
        self.graph_sizes = _graph_ladder(max_num_seqs) if self.on_cuda and not enforce_eager else []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

        per_block = kv_cache_bytes_per_block(config.num_layers, block_size, config.num_kv_heads, config.head_dim,
                                             kv_cache_dtype)
        if num_blocks is None:
            # Never more than every sequence at full length can use: more blocks could only keep
            # more finished prefixes cached, and the pool keeps a Python object per block.
            useful = max_num_seqs * self.layout.width
            num_blocks = min(useful, self._profile_num_blocks(per_block, gpu_memory_utilization) if self.on_cuda
                             else (1 << 30) // per_block)  # CPU: at most 1 GiB of cache
        check_kv_capacity(num_blocks, block_size, max_model_len)
        self.num_blocks, self.kv_caches = num_blocks, self._allocate_kv_caches(num_blocks)
        if self.graph_sizes:
            self._capture_graphs()
        for layer in model.layers:  # only now: profiling and capture run on dummy inputs
            layer.calibrate_kv_scale = calculate_kv_scales

    def execute(self, schedule: SchedulerOutput, previous: InFlight | None) -> InFlight:
        """Launch one step: its inputs, the forward, sampling and the tokens' copy to the host. It
        does not wait for the device. `previous` is the step still in flight, whose sampled tokens
        this step's placeholders read on the device."""
        # Rows by context, shortest first: attention starts from the last row, so the longest programs start first
        # and none runs alone at the end (H100, mixed contexts, batch 256: 92% -> 96.5% of copy). update() reads it.
        schedule.scheduled.sort(key=lambda entry: entry.start + entry.num_new_tokens)
        plan = self.prepare_inputs(schedule, previous)
        logits = self.run_model(plan)
        sampling_logits = logits[: plan.num_sampling]
        sampled = sample(sampling_logits, plan.sampling)
        host = self.sampled_host[self.stats.steps % 2][: plan.num_sampling].copy_(sampled, non_blocking=True)
        logprobs = []  # only steps that ask for them pay for log_softmax and the copies
        if plan.num_logprobs is not None:
            logprobs.append(logprobs_of(sampling_logits, sampled, plan.num_logprobs))
        if plan.prompt_positions:
            logprobs.append(logprobs_of(logits[plan.num_sampling:], plan.prompt_targets, plan.num_prompt_logprobs))
        logprobs_host = [tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=self.on_cuda).copy_(t, non_blocking=True)
                               for t in pair) for pair in logprobs]
        ready = torch.cuda.Event() if self.on_cuda else None
        if ready is not None:
            ready.record()
        self.stats.steps += 1
        return InFlight(plan, sampled, host, ready, logprobs_host)

    def prepare_inputs(self, schedule: SchedulerOutput, previous: InFlight | None) -> StepPlan:
        """Lay the step's requests out as one flat batch in the host buffer, then copy it once.

        This runs on the CPU for every step, so it is written for speed: plain lists, a short path
        for decodes (one token each), and one array -> tensor conversion per field."""
        block_size, vocab_size = self.block_size, self.model.config.vocab_size
        previous_rows = previous.plan.sample_row if previous is not None else {}
        input_ids, positions, slots, query_start, seq_lens, logits_indices = [], [], [], [0], [], []
        temperature, top_p, top_k, min_p, seeds, sample_row = [], [], [], [], [], {}
        placeholder_dst, placeholder_src, tables = [], [], []
        num_logprobs, adjusted, prompt_rows, prompt_positions, prompt_targets = None, [], [], [], []
        for entry in schedule.scheduled:
            request, start = entry.request, entry.start
            end = start + entry.num_new_tokens
            known, blocks, params = request.num_tokens, request.block_ids, request.sampling_params
            pending = None  # the newest token, sampled by the step still in flight: read on the device
            input_ids += request.all_token_ids[start:min(end, known)]
            if end > known:
                assert end == known + 1, "only a request's newest token may be a placeholder"
                pending = previous_rows[request.request_id]
                placeholder_dst.append(len(input_ids))
                placeholder_src.append(pending)
                input_ids.append(0)
            if end - start == 1:
                positions.append(start)
                slots.append(blocks[start // block_size] * block_size + start % block_size)
            else:
                positions += range(start, end)
                slots += token_slots(blocks, start, end, block_size)
            if params.prompt_logprobs is not None and start < len(request.prompt_token_ids) - 1:
                # Row of position p: the logprob of prompt token p + 1 (up to the prompt's last).
                last = min(end, len(request.prompt_token_ids) - 1)
                prompt_rows += range(len(input_ids) - (end - start), len(input_ids) - (end - last))
                prompt_positions += [(request, p + 1) for p in range(start, last)]
                prompt_targets += request.prompt_token_ids[start + 1:last + 1]
            query_start.append(len(input_ids))
            seq_lens.append(end)
            tables.append(blocks[: -(-end // block_size)])
            if entry.samples_token:
                row = sample_row[request.request_id] = len(logits_indices)
                # The noise of the k-th token a request draws depends on (its seed, k) alone.
                index = len(request.output_token_ids) + request.num_output_placeholders
                seeds.append(_seed_for(params.seed, index))
                logits_indices.append(len(input_ids) - 1)
                temperature.append(0.0 if params.is_greedy else params.temperature)
                top_p.append(params.top_p)
                top_k.append(params.top_k if 0 < params.top_k < vocab_size else 0)
                min_p.append(params.min_p)
                if params.logprobs is not None:
                    num_logprobs = max(num_logprobs or 0, params.logprobs)
                under_min_tokens = index <= params.min_tokens  # index counts this step's token already
                if params.has_penalties or under_min_tokens:
                    adjusted.append((row, request, pending, under_min_tokens))
        num_tokens, num_seqs, num_sampling = len(input_ids), len(seq_lens), len(logits_indices)
        max_query_len = max(b - a for a, b in zip(query_start, query_start[1:]))
        rows = num_seqs
        if max_query_len == 1 and self.graphs:
            rows = next((size for size in self.graphs if size >= num_seqs), num_seqs)
            pad = rows - num_seqs  # padding rows: no token written, no key read (seq_len 0)
            for values, fill in ((input_ids, 0), (positions, 0), (slots, -1), (seq_lens, 0)):
                values += [fill] * pad
            query_start += range(num_seqs + 1, rows + 1)
            num_tokens = rows

        self._copy_to_device(rows, tables, dict(
            input_ids=input_ids, positions=positions, slot_mapping=slots, query_start_loc=query_start, top_k=top_k,
            seq_lens=seq_lens, logits_indices=logits_indices + prompt_rows, seeds=seeds, temperature=temperature,
            top_p=top_p, min_p=min_p, placeholder_dst=placeholder_dst, placeholder_src=placeholder_src))
        layout, device = self.layout, self.device_buffer
        if placeholder_dst:
            dst = layout.view(device, "placeholder_dst", len(placeholder_dst)).long()
            src = layout.view(device, "placeholder_src", len(placeholder_src)).long()
            tokens = previous.sampled.index_select(0, src).to(torch.int32)
            layout.view(device, "input_ids", num_tokens).index_copy_(0, dst, tokens)
        sampling = SamplingTensors(
            temperature=layout.view(device, "temperature", num_sampling).view(torch.float32),
            top_p=layout.view(device, "top_p", num_sampling).view(torch.float32),
            top_k=layout.view(device, "top_k", num_sampling), seeds=layout.view(device, "seeds", num_sampling),
            all_greedy=not any(temperature), needs_top_k_top_p=any(top_k) or any(p < 1 for p in top_p) or any(min_p),
            min_p=layout.view(device, "min_p", num_sampling).view(torch.float32) if any(min_p) else None,
            adjust=logits_adjustment(adjusted, num_sampling, vocab_size, self.eos_token_ids, previous, self.device)
            if adjusted else None)
        self.stats.context_tokens_read += sum(seq_lens)
        return StepPlan(schedule, num_tokens, rows, num_sampling, max_query_len, max(seq_lens), sample_row, sampling,
                        num_logprobs, prompt_positions,
                        _to_device(prompt_targets, self.device) if prompt_rows else None,
                        max((r.sampling_params.prompt_logprobs for r, _ in prompt_positions), default=0))

    def _copy_to_device(self, rows, tables, fields):
        """Write every field into this step's pinned host buffer, then copy the used prefix once."""
        host, layout = self.host_buffers[self.stats.steps % 2], self.layout
        for name, values in fields.items():
            if values:
                as_bits = array("f" if name in ("temperature", "top_p", "min_p") else "i", values)
                layout.view(host, name, len(values)).copy_(torch.frombuffer(as_bits, dtype=torch.int32))
        # The block table: only the columns this batch uses are filled; the kernels never read past
        # a request's own blocks, so what earlier steps left in the other columns does no harm.
        used_width = max(map(len, tables))
        flat = array("i")
        for table in tables:
            flat.extend(table)
            flat.extend(self.zeros[: used_width - len(table)])
        layout.block_table_view(host, rows)[: len(tables), :used_width].copy_(
            torch.frombuffer(flat, dtype=torch.int32).view(len(tables), used_width))
        used = layout.block_table + rows * layout.width
        self.device_buffer[:used].copy_(host[:used], non_blocking=True)

    def _model_inputs(self, num_tokens, num_seqs, max_query_len, max_seq_len, num_logits):
        """Views of the device buffer as the model's arguments (static for a given shape)."""
        layout, buffer = self.layout, self.device_buffer
        meta = AttentionMetadata(
            slot_mapping=layout.view(buffer, "slot_mapping", num_tokens).long(),
            query_start_loc=layout.view(buffer, "query_start_loc", num_seqs + 1),
            seq_lens=layout.view(buffer, "seq_lens", num_seqs),
            block_table=layout.block_table_view(buffer, num_seqs),
            max_query_len=max_query_len, max_seq_len=max_seq_len)
        logits_indices = None if num_logits is None else layout.view(buffer, "logits_indices", num_logits).long()
        return (layout.view(buffer, "input_ids", num_tokens).long(),
                layout.view(buffer, "positions", num_tokens).long(), self.kv_caches, meta, logits_indices)

    def run_model(self, plan: StepPlan) -> torch.Tensor:
        """Logits of the sampling rows, then of the prompt-logprobs rows: a graph replay for
        decode-only batches, else eager."""
        num_logits = plan.num_sampling + len(plan.prompt_positions)
        calibrating = any(layer.calibrate_kv_scale for layer in self.model.layers)  # graphs do not: run eager
        if plan.num_rows in self.graphs and plan.max_query_len == 1 and not calibrating:
            graph, logits = self.graphs[plan.num_rows]
            graph.replay()
            self.stats.graph_steps += 1
            if num_logits == plan.num_sampling == plan.num_rows:
                return logits[:num_logits]
            return logits.index_select(0, self.layout.view(self.device_buffer, "logits_indices", num_logits).long())
        with torch.inference_mode():
            return self.model(*self._model_inputs(plan.num_tokens, plan.num_rows, plan.max_query_len,
                                                  plan.max_seq_len, num_logits))

    def _allocate_kv_caches(self, num_blocks: int) -> torch.Tensor:
        c = self.model.config
        return allocate_kv_cache(c.num_layers, num_blocks, self.block_size, c.num_kv_heads, c.head_dim,
                                 self.kv_cache_dtype, self.device)

    def _profile_num_blocks(self, bytes_per_block, gpu_memory_utilization):
        """Run the largest step the engine can schedule through execute(), on dummy requests and a
        scratch cache, and size the KV cache from the memory left at its peak."""
        num_seqs = min(self.max_num_seqs, self.max_num_batched_tokens)
        per_seq = min(-(-self.max_num_batched_tokens // num_seqs), self.max_model_len)
        num_tokens = min(self.max_num_batched_tokens, num_seqs * per_seq)
        lengths = [per_seq] * (num_tokens // per_seq) + ([num_tokens % per_seq] if num_tokens % per_seq else [])
        params = SamplingParams(top_p=0.5, top_k=5, seed=0)  # the sampler's sorting path: its largest
        entries, num_scratch_blocks = [], 0
        for length in lengths:
            request = Request("profile", [0] * length, params)
            num_blocks = -(-length // self.block_size)
            request.block_table.block_ids = list(range(num_scratch_blocks, num_scratch_blocks + num_blocks))
            num_scratch_blocks += num_blocks
            entries.append(ScheduledRequest(request, 0, length, samples_token=True))
        self.kv_caches = self._allocate_kv_caches(num_scratch_blocks)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(SchedulerOutput(entries, num_tokens, [], step=0), None).sampled_token_ids()
        peak = torch.cuda.max_memory_allocated(self.device) - self.kv_caches.numel() * self.kv_caches.element_size()
        # Each decode graph keeps its own logits alive after capture, which comes after this; a
        # step with logprobs or penalties holds a few more [rows, vocab] fp32 tensors at once.
        peak += (sum(self.graph_sizes) + 4 * len(lengths)) * self.model.config.vocab_size * 4
        del self.kv_caches
        self.stats = EngineStats()
        torch.cuda.empty_cache()
        return num_blocks_from_memory(bytes_per_block, gpu_memory_utilization, peak, self.device)

    def _capture_graphs(self):
        """One CUDA graph per decode batch size of a ladder; a batch is padded up to the next size.

        Without graphs a small model's decode step costs more in kernel launches than in work."""
        sizes, buffer, layout = self.graph_sizes, self.device_buffer, self.layout
        gc.collect()  # an earlier engine's graphs freed by the collector mid-capture would invalidate the capture
        layout.view(buffer, "slot_mapping", sizes[-1]).fill_(-1)      # capture writes no KV
        layout.view(buffer, "query_start_loc", sizes[-1] + 1).copy_(torch.arange(sizes[-1] + 1))
        layout.view(buffer, "seq_lens", sizes[-1]).fill_(1)
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first: smaller graphs reuse its scratch memory
                # The inputs are built inside the capture too: their int32 -> int64 casts must replay.
                def forward():
                    return self.model(*self._model_inputs(size, size, 1, self.max_model_len, None))
                forward()  # compiles the kernels for this shape outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = forward()
                pool, self.graphs[size] = graph.pool(), (graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()


# ---- Sampling: one pass over the batch on the device, no host sync. -------------------------------------------------

@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [rows] float32; 0 = greedy
    top_p: torch.Tensor        # [rows] float32
    top_k: torch.Tensor        # [rows] int32; 0 = off
    seeds: torch.Tensor        # [rows] int32: the noise of each row's draw (see sample)
    all_greedy: bool
    needs_top_k_top_p: bool    # some row has top_k, top_p or min_p on
    min_p: torch.Tensor | None = None          # [rows] float32
    adjust: "LogitsAdjustment | None" = None  # penalties, min_tokens: None for most steps


@dataclass
class LogitsAdjustment:
    """A step's changes to its rows' logits before the draw (after logprobs): penalties, min_tokens' bans."""
    output_counts: torch.Tensor  # [rows, vocab] float32: how often each token is in the row's output
    prompt_mask: torch.Tensor    # [rows, vocab] bool: tokens of the row's prompt
    repetition: torch.Tensor     # [rows] float32 (1 = off)
    frequency: torch.Tensor      # [rows] float32 (0 = off)
    presence: torch.Tensor       # [rows] float32 (0 = off)
    banned_rows: torch.Tensor    # [n] int64, with banned_tokens: (row, token) pairs set to -inf
    banned_tokens: torch.Tensor


def adjust_logits(logits, adjust: LogitsAdjustment):
    """vLLM's order: repetition penalty (HF: over prompt and output, a positive logit divided by it,
    a negative one multiplied), then frequency and presence (OpenAI: output tokens only), then bans."""
    seen = adjust.prompt_mask | (adjust.output_counts > 0)
    penalty = torch.where(seen, adjust.repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - adjust.frequency[:, None] * adjust.output_counts
    logits = logits - adjust.presence[:, None] * (adjust.output_counts > 0)
    return logits.index_put((adjust.banned_rows, adjust.banned_tokens), logits.new_tensor(float("-inf")))


def logits_adjustment(adjusted, num_rows: int, vocab_size: int, eos_token_ids: list[int],
                      previous: "InFlight | None", device) -> LogitsAdjustment:
    """Penalties' token counts and min_tokens' bans for `adjusted`: (row, request, row of its token
    in flight or None, under min_tokens) each. A token in flight is counted on the device."""
    to_device = functools.partial(_to_device, device=device)
    factors = [[1.0, 0.0, 0.0] for _ in range(num_rows)]  # repetition, frequency, presence
    counted, prompt, pending, banned = ([], []), ([], []), ([], []), ([], [])
    for row, request, pending_src, under_min_tokens in adjusted:
        params = request.sampling_params
        if params.has_penalties:
            factors[row] = [params.repetition_penalty, params.frequency_penalty, params.presence_penalty]
            counted[0].extend([row] * len(request.output_token_ids))
            counted[1].extend(request.output_token_ids)
            prompt[0].extend([row] * len(request.prompt_token_ids))
            prompt[1].extend(request.prompt_token_ids)
            if pending_src is not None:
                pending[0].append(row)
                pending[1].append(pending_src)
        if under_min_tokens:  # EOS (unless ignored) and stop tokens may not come yet
            stops = [*params.stop_token_ids, *(() if params.ignore_eos else eos_token_ids)]
            stops = [token for token in stops if 0 <= token < vocab_size]
            banned[0].extend([row] * len(stops))
            banned[1].extend(stops)
    counts = torch.zeros(num_rows, vocab_size, device=device)
    counts.index_put_(tuple(map(to_device, counted)), torch.ones(len(counted[0]), device=device), accumulate=True)
    if pending[0]:
        tokens = previous.sampled.index_select(0, to_device(pending[1]))
        counts.index_put_((to_device(pending[0]), tokens), torch.ones(len(pending[0]), device=device), accumulate=True)
    prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
    prompt_mask[tuple(map(to_device, prompt))] = True
    factors = to_device(factors, dtype=torch.float32)
    return LogitsAdjustment(counts, prompt_mask, factors[:, 0], factors[:, 1], factors[:, 2], *map(to_device, banned))


def apply_top_k_top_p(logits, top_k, top_p, min_p=None):
    """Mask every token outside each row's top-k or less likely than min_p times the most likely
    one, then outside the smallest set of the rest whose mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).to(ranks.dtype)
    drop = ranks[None, :] >= k[:, None]
    if min_p is not None:  # vLLM's order: min_p and top-k cut the tail, top-p what is left of it
        drop |= sorted_logits < sorted_logits[:, :1] + min_p.log()[:, None]  # p < min_p * p_max
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # A token is kept while the mass *before* it is below top_p; the most likely one always stays.
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits, params: SamplingTensors):
    """One token per row: the argmax for greedy rows, else a draw from softmax(logits / T) by the
    Gumbel-max trick: argmax(logits / T + G), G = -log(-log(U)), U uniform, is such a draw, in one
    pass over the vocabulary with no softmax, cumsum or search. Each row's U comes from a seed of
    (the request's seed, the token's index), so a seeded request draws the same tokens in any batch."""
    if params.adjust is not None:
        logits = adjust_logits(logits.float(), params.adjust)
    if params.all_greedy:
        return logits.argmax(-1)
    temperature = params.temperature
    if params.needs_top_k_top_p:  # rare: sort-based masking on logits / T, then draw at T = 1
        sampled = temperature > 0
        logits = apply_top_k_top_p(logits.float() / torch.where(sampled, temperature, 1.0)[:, None],
                                   params.top_k, params.top_p, params.min_p)
        temperature = sampled.float()
    draw = gumbel_argmax if logits.is_cuda else gumbel_argmax_reference
    return draw(logits, temperature, params.seeds)


def logprobs_of(logits, token_ids, k: int):
    """vLLM's raw logprobs (log_softmax of the model's logits): ints [rows, 1 + k] (the rank of
    token_ids[row], 1 = most likely, then the top k ids) and floats [rows, 1 + k] (their logprobs)."""
    logprobs = logits.log_softmax(-1, dtype=torch.float32)
    chosen = logprobs.gather(1, token_ids[:, None])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    ranks = (logprobs > chosen).sum(-1, keepdim=True) + 1
    return torch.cat([ranks, top_ids], 1), torch.cat([chosen, top_values], 1)


GUMBEL_BLOCK = 2048  # vocabulary entries per program: rows x slices programs fill the GPU even for one row


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temperature_ptr, seeds_ptr, value_ptr, index_ptr, vocab_size, stride_row,
                          BLOCK: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)  # the best of one slice of one row's vocabulary
    offsets = part * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride_row + offsets, mask=offsets < vocab_size, other=float("-inf")).to(tl.float32)
    temperature = tl.load(temperature_ptr + row)
    if temperature > 0:  # rand4x: 4 uniforms per Philox call, 1.5x faster at 256 rows than rand. U = 0: never chosen
        u = tl.rand4x(tl.load(seeds_ptr + row), part * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
        u = tl.reshape(tl.join(tl.join(u[0], u[1]), tl.join(u[2], u[3])), [BLOCK])
        x = x * (1.0 / temperature) - tl.log(-tl.log(u))
    tl.store(value_ptr + row * tl.num_programs(1) + part, tl.max(x, 0))
    tl.store(index_ptr + row * tl.num_programs(1) + part, tl.argmax(x, 0) + part * BLOCK)


def gumbel_argmax(logits, temperature, seeds):
    """argmax(logits / T + Gumbel noise) per row (T = 0: plain argmax), one read of the logits. Ties go to the
    lowest index, as torch.argmax: the first best within a slice (tl.argmax), then the first slice's."""
    rows, parts = logits.shape[0], triton.cdiv(logits.shape[1], GUMBEL_BLOCK)
    values, index = (torch.empty(rows, parts, dtype=t, device=logits.device) for t in (torch.float32, torch.int64))
    if rows:
        _gumbel_argmax_kernel[(rows, parts)](logits, temperature, seeds, values, index, logits.shape[1],
                                             logits.stride(0), BLOCK=GUMBEL_BLOCK)
    return index.gather(1, values.argmax(1, keepdim=True)).squeeze(1)


def gumbel_argmax_reference(logits, temperature, seeds):
    """gumbel_argmax in plain torch (the noise comes from torch's generator, not Triton's)."""
    out = logits.argmax(-1)
    for row in (temperature > 0).nonzero().flatten().tolist():
        generator = torch.Generator(logits.device).manual_seed(int(seeds[row]))
        uniform = torch.rand(logits.shape[1], generator=generator, device=logits.device)
        out[row] = (logits[row].float() / temperature[row] - torch.log(-torch.log(uniform))).argmax()
    return out


def _seed_for(seed: int, index: int) -> int:
    """A 31-bit seed derived from (seed, index): the k-th draw of a request, the k-th of n completions."""
    return hash((seed, index)) & 0x7FFFFFFF


def _to_device(values: list, device, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _graph_ladder(max_num_seqs):
    """Decode batch sizes with a CUDA graph: 1, 2, 4, then every multiple of 8 (padding wastes < 8 rows)."""
    return sorted({size for size in (1, 2, 4, *range(8, max_num_seqs + 1, 8), max_num_seqs) if size <= max_num_seqs})


def _check_engine_args(args: dict) -> None:
    """ValueError naming the first bad LLM argument: each is checked here, once, where the user passes it."""
    flag = (lambda v: isinstance(v, bool), "a bool")
    check_fields("", args, {
        "block_size": (lambda v: is_int(v) and 1 <= v <= 256 and not v & (v - 1), "a power of two from 1 to 256"),
        "max_num_batched_tokens": (int_at_least(1), "an int >= 1"), "max_num_seqs": (int_at_least(1), "an int >= 1"),
        "max_model_len": (int_at_least(2, or_none=True), "an int >= 2, or None for the model's limit"),
        "num_blocks": (int_at_least(1, or_none=True), "an int >= 1, or None to size the cache from memory"),
        "long_prefill_token_threshold": (int_at_least(0), "an int >= 0 (0: no cap)"), "seed": (is_int, "an int"),
        "gpu_memory_utilization": (lambda v: number_in(0, 1)(v) and v > 0, "a number in (0, 1]"),
        "enable_prefix_caching": flag, "async_scheduling": flag, "enforce_eager": flag, "calculate_kv_scales": flag,
        "kv_cache_dtype": (lambda v: v in ("auto", "fp8", "fp8_e4m3"), "one of 'auto', 'fp8', 'fp8_e4m3'")})


def _as_token_ids(ids) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"prompt: expected a string, a list of token ids or a dict, got {type(ids).__name__} "
                         f"{str(ids)[:40]}")
    return list(ids)


def _as_prompt_list(prompts) -> list:
    """One prompt (a string, a list of ids, a dict) or a list of them."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts: expected a prompt (a string, a list of token ids or a dict) or a list of "
                         f"prompts, got {type(prompts).__name__}")
    prompts = list(prompts)
    return [prompts] if prompts and all(isinstance(p, int) for p in prompts) else prompts


def _error_output(request_id, prompt, message) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
    return RequestOutput(request_id, text, [], None, [CompletionOutput(0, "", [], None, None, "error")], True, 0,
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


def _stop_string_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that is the start of a stop string."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])),
               default=0)


class _Progress:
    """A one-line progress report on a terminal: requests done, output tokens/s."""

    def __init__(self, total, stats, enabled):
        self.total, self.stats, self.enabled = total, stats, enabled
        self.first_tokens, self.start, self.last = stats.output_tokens, time.perf_counter(), 0.0

    def update(self, done):
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or done == self.total):
            self.last, rate = now, (self.stats.output_tokens - self.first_tokens) / max(now - self.start, 1e-9)
            sys.stderr.write(f"\rProcessed {done}/{self.total} requests | {rate:,.0f} output tok/s"
                             + "\n" * (done == self.total))

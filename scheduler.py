"""The scheduler: which requests run in the next step, and how many of their tokens each.

The idea (vLLM V1): there is no prefill phase and no decode phase. A request has known tokens
(prompt + outputs) and `num_computed_tokens`, the ones whose KV is in the cache; each step hands out
a budget of `max_num_batched_tokens` and every scheduled request computes as many of its remaining
tokens as it gets. A decode is a request that is one token short, a chunked prefill one that gets
part of its prompt; one batch mixes both, so a long prompt never stalls the running decodes.

Async overlap: schedule() advances num_computed_tokens at once and counts the token a step will
sample as a placeholder, so the next schedule() can run before the step's tokens reach the CPU (the
engine reads the placeholder's value from the previous step's output on the GPU); update() fills in
the real tokens and applies stop conditions. Synchronous use is update() right after schedule():
one code path for both.

A step that fails or is interrupted is undone by recover(): every unfinished request is preempted
(it keeps its tokens and recomputes its KV) and the cache forgets the unfinished steps' blocks.

Owns: the engine's configuration and SamplingParams (what a user passes, validated where passed),
requests and their states, the plan of a step, preemption, and every stop rule: stop tokens, EOS,
min_tokens (the bans the sampler applies come from here), max_tokens, and where a stop string
ends the text. Never touches: tensors, the GPU, text (it hands the engine positions and block
tables; the engine asks it about text it has decoded).

Speculative decoding: a decoding request gets 1 + k tokens of the budget (its newest and k n-gram drafts);
update() moves num_computed_tokens back over the rejected ones. Drafts never enter all_token_ids, so a
block enters the prefix cache only once all its tokens are verified.
"""
from collections import deque
from dataclasses import dataclass, field, fields
import enum
import math

import numpy as np

from kv_cache import BlockTable, KVCacheManager, cdiv


def _max_tokens(params) -> float:
    return math.inf if params.max_tokens is None else params.max_tokens


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(low: int, or_none: bool = False):
    return lambda v: (or_none and v is None) or is_int(v) and v >= low


def number_in(low: float = -math.inf, high: float = math.inf):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def check_fields(prefix: str, values: dict, rules: dict) -> None:
    """ValueError naming the first value that breaks its rule (name -> (test, what it may be))."""
    for name, (ok, allowed) in rules.items():
        if not ok(values[name]):
            raise ValueError(f"{prefix}{name} must be {allowed}, got {values[name]!r}")


# Rules that several fields share.
FLAG = (lambda v: isinstance(v, bool), "a bool")
POSITIVE_INT = (int_at_least(1), "an int >= 1")
FRACTION = (lambda v: number_in(0, 1)(v) and v > 0, "a number in (0, 1]")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's speculative_config for n-gram drafts (propose_ngram_drafts); none while more than
    disable_by_batch_size requests run: a big batch is bound by its matmuls, and extra tokens cost more than
    the steps they save."""
    method: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    disable_by_batch_size: int = 32

    def __post_init__(self):
        check_fields("speculative_config.", vars(self), {
            "method": (lambda v: v == "ngram", "'ngram' (the one method here)"),
            **dict.fromkeys(("num_speculative_tokens", "prompt_lookup_max", "disable_by_batch_size"), POSITIVE_INT),
            "prompt_lookup_min": (lambda v: int_at_least(1)(v) and v <= self.prompt_lookup_max,
                                  f"an int in [1, prompt_lookup_max={self.prompt_lookup_max}]")})


def speculative_config(spec: dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """A dict of vLLM's keys as a SpeculativeConfig, with vLLM's defaults: a missing lookup bound equals the
    other, both 5 if both are missing."""
    if spec is None or isinstance(spec, SpeculativeConfig):
        return spec
    known = [f.name for f in fields(SpeculativeConfig)]
    if unknown := sorted(set(spec if isinstance(spec, dict) else [repr(spec)]) - set(known)):
        raise ValueError(f"speculative_config: unknown keys {unknown}; known: {known}")
    lookup_max = spec.get("prompt_lookup_max", spec.get("prompt_lookup_min", 5))
    return SpeculativeConfig(**{"prompt_lookup_max": lookup_max, "prompt_lookup_min": lookup_max, **spec})


def propose_ngram_drafts(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (max_n down to min_n tokens). A few numpy passes over the tokens (~15 us at 2k tokens)."""
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where the last token occurred before
    length = 1
    for back in range(1, min(max_n, len(tokens) - 1)):  # keep the ends whose match reaches one token further back
        longer = ends[ends >= back]
        longer = longer[tokens[longer - back] == tokens[-1 - back]]
        if not len(longer):
            break
        ends, length = longer, back + 1
    if length < min_n or not len(ends):
        return []
    # k tokens after the match; past the context's end the copy reads itself (LZ77-style): a pattern repeats.
    period = len(tokens) - 1 - ends[-1]
    return tokens[ends[-1] + 1 + np.arange(k) % period].tolist()


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits, with vLLM's names and defaults, checked once where the user passes them
    (LLM(...)) and handed to the scheduler and the runner. max_model_len None: the model's limit."""
    dtype: object = None
    device: object = None
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    async_scheduling: bool = True
    enforce_eager: bool = False
    seed: int = 0
    num_blocks: int | None = None  # None: size the KV cache from memory
    long_prefill_token_threshold: int = 0
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask for (vLLM's cap)
    tensor_parallel_size: int = 1  # ranks (one GPU each) sharing every layer; more than the GPUs: engine.py refuses
    # A token at context L counts 1 + L / P of max_num_batched_tokens (P: the model's attention_parity_context), so
    # a step's FLOPs, hence its time, stay bounded however long the contexts of its prefill chunks (the server's)
    budget_counts_attention: bool = False
    speculative_config: SpeculativeConfig | dict | None = None  # a dict of vLLM's keys; None: no drafts
    quantization: str | None = None  # "fp8": linear weights in e4m3 (an fp8 checkpoint's are, with or without it)

    def __post_init__(self):
        object.__setattr__(self, "speculative_config", speculative_config(self.speculative_config))
        check_fields("", vars(self), {
            "block_size": (lambda v: is_int(v) and 1 <= v <= 256 and not v & (v - 1), "a power of two from 1 to 256"),
            **dict.fromkeys(("max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"), POSITIVE_INT),
            "max_model_len": (int_at_least(2, or_none=True), "an int >= 2, or None for the model's limit"),
            "num_blocks": (int_at_least(1, or_none=True), "an int >= 1, or None to size the cache from memory"),
            "long_prefill_token_threshold": (int_at_least(0), "an int >= 0 (0: no cap)"), "seed": (is_int, "an int"),
            "gpu_memory_utilization": FRACTION, "max_logprobs": (int_at_least(0), "an int >= 0"),
            **dict.fromkeys(("enable_prefix_caching", "async_scheduling", "enforce_eager"), FLAG),
            "calculate_kv_scales": FLAG, "budget_counts_attention": FLAG,
            "kv_cache_dtype": (lambda v: v in ("auto", "fp8", "fp8_e4m3"), "one of 'auto', 'fp8', 'fp8_e4m3'"),
            "quantization": (lambda v: v in (None, "fp8"), "one of None, 'fp8'")})


@dataclass
class SamplingParams:
    """How to pick tokens: vLLM's names, defaults and ranges (top_k 0 or -1: off; max_tokens None: to
    max_model_len; temperature < 1e-5: greedy). Penalties as in vLLM: repetition_penalty is HF's (prompt
    and output tokens), presence and frequency OpenAI's (output tokens only)."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None         # top-k logprobs per output token (the sampled one always)
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    skip_special_tokens: bool = True
    detokenize: bool = True

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5  # vLLM's threshold

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def __post_init__(self):
        """ValueError naming the first bad field (the engine checks its own copy again: the fields are mutable)."""
        self.stop = [self.stop] if isinstance(self.stop, str) else [] if self.stop is None else self.stop
        self.stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        check_fields("SamplingParams.", vars(self), {
            "n": POSITIVE_INT, "top_k": (int_at_least(-1), "an int >= -1 (0 or -1 disables it)"),
            "temperature": (number_in(0), "a finite number >= 0 (0 = greedy)"), "top_p": FRACTION,
            "min_p": (number_in(0, 1), "a number in [0, 1]"), "seed": (lambda v: v is None or is_int(v), "an int/None"),
            **dict.fromkeys(("presence_penalty", "frequency_penalty"), (number_in(-2, 2), "a number in [-2, 2]")),
            "repetition_penalty": (lambda v: number_in(0)(v) and v > 0, "a finite number > 0"),
            "max_tokens": (int_at_least(1, or_none=True), "an int >= 1 or None"),
            "min_tokens": (lambda v: is_int(v) and 0 <= v <= _max_tokens(self), "an int in [0, max_tokens]"),
            "stop": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v),
                     "a non-empty string or a list of them"),
            "stop_token_ids": (lambda v: isinstance(v, (list, tuple)) and all(is_int(i) for i in v), "a list of ints"),
            **dict.fromkeys(("logprobs", "prompt_logprobs"), (int_at_least(0, or_none=True), "an int >= 0 or None")),
            **dict.fromkeys(("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "detokenize"), FLAG)})
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)  # our own copies


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits at the front of the queue to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    def __init__(self, value: str):
        self.is_finished = value not in ("waiting", "running", "preempted")  # a plain attribute: read per token


@dataclass(eq=False)
class Request:
    """All of one request's state. Positions 0..num_computed_tokens-1 have their KV in the cache."""
    request_id: str | tuple  # the engine names the n completions of one request (id, i): never a user's id
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    output_token_ids: list[int] = field(default_factory=list, init=False)
    all_token_ids: list[int] = field(init=False, repr=False)  # prompt + outputs (rebuilt only by recover())
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    num_cached_tokens: int = field(default=0, init=False)        # prefix-cache hit at first admission
    num_output_placeholders: int = field(default=0, init=False)  # sampled, value not known yet
    error: str | None = field(default=None, init=False)
    stop_reason: int | str | None = field(default=None, init=False)  # the stop token id or string, not EOS
    block_table: BlockTable = field(default_factory=BlockTable, init=False, repr=False)
    token_array: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), init=False, repr=False)
    num_arrayed: int = field(default=0, init=False)  # all_token_ids[:num_arrayed] are in token_array

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def block_ids(self) -> list[int]:
        return self.block_table.block_ids

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: positions start .. start+num_new_tokens-1."""
    request: Request
    start: int           # its num_computed_tokens before this step
    num_new_tokens: int
    samples_token: bool  # the step reaches its last token (placeholders included): sample one
    banned_token_ids: list[int] | None = None  # tokens it may not sample yet (min_tokens: the stop tokens)
    draft_token_ids: list[int] = field(default_factory=list)  # the last num_new_tokens are guesses to verify


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # in admission order; the runner may lay its rows out in any other
    finished: list[Request]            # ended inside schedule() (FINISHED_ERROR): report them
    step: int                          # steps are numbered from 1 and update()d in this order


def find_stop_string(params: SamplingParams, num_output_tokens: int, text: str, start: int) -> tuple[int, str] | None:
    """(where the text ends, the stop string) for the first stop string ending at or after text[start]
    (the text not searched yet); none before the output has more than min_tokens tokens (vLLM's rule)."""
    searched = params.stop if num_output_tokens > params.min_tokens else ()
    hits = [(at, stop) for stop in searched if (at := text.find(stop, max(0, start - len(stop) + 1))) >= 0]
    if not hits:
        return None
    at, stop = min(hits)
    return at + len(stop) if params.include_stop_str_in_output else at, stop


def check_new_request(request: Request, max_model_len: int, vocab_size: int, max_logprobs: int,
                      kv: KVCacheManager) -> None:
    """ValueError for what is wrong with a request from the start: nothing it carries may fail a step later."""
    rid, prompt = request.request_id, request.prompt_token_ids
    if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
        raise ValueError(f"request {rid!r} was already added once; make a new Request")
    if not prompt:
        raise ValueError(f"request {rid!r}: prompt_token_ids is empty; it needs at least 1 token")
    if len(prompt) >= max_model_len:
        raise ValueError(f"request {rid!r}: the prompt has {len(prompt)} tokens, but max_model_len="
                         f"{max_model_len} allows at most {max_model_len - 1} (room for 1 output token)")
    for name in ("logprobs", "prompt_logprobs"):  # what logprobs_of's topk could not do in a step
        if (k := getattr(request.sampling_params, name)) is not None and k > min(max_logprobs, vocab_size):
            raise ValueError(f"request {rid!r}: SamplingParams.{name}={k}, but at most max_logprobs="
                             f"{max_logprobs} and the vocabulary's {vocab_size} are allowed")
    if bad := [t for t in prompt if not (is_int(t) and 0 <= t < vocab_size)]:
        raise ValueError(f"request {rid!r}: prompt_token_ids holds {bad[0]!r}; token ids must be "
                         f"ints in [0, vocab_size={vocab_size})")
    if cdiv(len(prompt), kv.block_size) > kv.num_blocks:
        raise ValueError(f"request {rid!r}: {too_big(len(prompt), kv)}")


def too_big(num_tokens: int, kv: KVCacheManager) -> str:
    return (f"{num_tokens} tokens need {cdiv(num_tokens, kv.block_size)} KV blocks of {kv.block_size}, "
            f"but the whole pool has {kv.num_blocks}: raise gpu_memory_utilization (or num_blocks), "
            f"or lower max_model_len / max_tokens")


def _token_array(request: Request) -> np.ndarray:
    """The request's tokens as a numpy array for the proposer, grown in place: a step copies only its new tokens."""
    tokens = request.all_token_ids
    if len(request.token_array) < len(tokens):
        request.token_array = np.resize(request.token_array, 2 * len(tokens))
    request.token_array[request.num_arrayed:len(tokens)] = tokens[request.num_arrayed:]
    request.num_arrayed = len(tokens)
    return request.token_array[:len(tokens)]


class Scheduler:
    """Runs requests under a token budget; see the module docstring. Only running requests hold
    blocks; the waiting queue is FCFS, with preempted requests put back at its front."""

    def __init__(self, config: EngineConfig, num_blocks: int, vocab_size: int, eos_token_ids,
                 parity_context: int | None = None):
        assert config.max_model_len is not None, "the engine resolves max_model_len from the model first"
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.max_num_batched_tokens, self.max_num_seqs = config.max_num_batched_tokens, config.max_num_seqs
        self.max_model_len, self.vocab_size = config.max_model_len, vocab_size
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))  # the one list of EOS ids: stops and min_tokens' bans
        self.long_prefill_token_threshold, self.max_logprobs = config.long_prefill_token_threshold, config.max_logprobs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # admission order: the last one is preempted first
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.num_preemptions = self.num_scheduled_steps = 0
        self.num_finished_steps = 0  # update() has run for every step up to this one
        self.prompt_logprob_rows_left = config.max_num_seqs  # per step: see _cap
        self.parity_context = parity_context if config.budget_counts_attention else None
        self.speculative_config = config.speculative_config
        self.draft_pause = 0  # steps left without drafting (see schedule)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add(self, request: Request) -> None:
        """Queue a request. ValueError for what is wrong with it from the start."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already used by an unfinished request")
        check_new_request(request, self.max_model_len, self.vocab_size, self.max_logprobs, self.kv_cache_manager)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Plan one step: running requests first (in admission order), then waiting ones (FCFS)."""
        budget, scheduled, finished = self.max_num_batched_tokens, [], []
        self.num_scheduled_steps += 1
        self.prompt_logprob_rows_left = self.max_num_seqs
        self.kv_cache_manager.step = self.num_scheduled_steps  # blocks cached now are computed by this step
        num_preemptions_before, index, drafting = self.num_preemptions, 0, self.drafting()
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new_tokens = self._num_new_tokens(request, budget)
            drafts = self._propose_drafts(request, num_new_tokens, budget) if drafting else []
            if num_new_tokens and self._allocate_or_preempt(request, num_new_tokens + len(drafts), finished):
                scheduled.append(self._advance(request, num_new_tokens, drafts))
                budget -= self._cost(scheduled[-1])
            index += 1
        # Drafting runs steps synchronously (drafts need the newest token); a step that found none overlaps the
        # next few, so a batch without drafts keeps nearly all of async overlap's speed.
        self.draft_pause = (4 if drafting and not any(s.draft_token_ids for s in scheduled)
                            else max(0, self.draft_pause - 1))
        # A request preempted this step would come straight back in and push someone else out: admit nobody
        # until the next step (by then update() has taken a victim's token in flight).
        if self.num_preemptions == num_preemptions_before:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                assert not request.num_output_placeholders, "readmitting a request with a token in flight"
                if (num_new_tokens := self._admit(request, budget)) == 0 and self.running:
                    break  # FCFS: the head waits until blocks are freed
                self.waiting.popleft()
                if num_new_tokens == 0:  # nothing else holds blocks: it will never fit
                    error = too_big(request.num_tokens, self.kv_cache_manager)
                    self._finish(request, RequestStatus.FINISHED_ERROR, error)
                    finished.append(request)
                    continue
                self.running.append(request)
                scheduled.append(self._advance(request, num_new_tokens))
                budget -= self._cost(scheduled[-1])
        return SchedulerOutput(scheduled, finished, self.num_scheduled_steps)

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[Request, list[int]]) -> list[Request]:
        """Take a step's sampled tokens (per scheduled request with samples_token, keyed by the request:
        one token, or with drafts the accepted ones and one more), apply stop conditions (a stop inside
        accepted drafts drops the tokens after it), free finished requests. Returns the requests that finished."""
        samplers = [s for s in output.scheduled if s.samples_token]
        if len(samplers) != len(sampled_token_ids) or not all(s.request in sampled_token_ids for s in samplers):
            raise ValueError(f"sampled_token_ids has {len(sampled_token_ids)} tokens, but the step "
                             f"has {len(samplers)} requests that sample, and each needs its own")
        finished = []
        for entry in samplers:
            request, tokens = entry.request, sampled_token_ids[entry.request]
            if request.status.is_finished:  # stopped one step earlier, or aborted: an extra token
                continue
            request.num_output_placeholders -= 1
            # Rejected drafts: their KV slots are not valid and are computed again from the real tokens.
            request.num_computed_tokens -= len(entry.draft_token_ids) + 1 - len(tokens)
            for token in tokens:
                request.output_token_ids.append(token)
                request.all_token_ids.append(token)
                if (status := self._stop_status(request, token)) is not None:
                    if request.status is not RequestStatus.RUNNING:  # preempted while its token was in flight
                        self.waiting.remove(request)
                    self._finish(request, status)
                    finished.append(request)
                    break
        if finished:
            self.running = [r for r in self.running if not r.status.is_finished]
        self.num_finished_steps = output.step  # its K/V is written: its cached blocks are trusted
        return finished

    def recover(self) -> None:
        """Undo every unfinished step (failed, interrupted, or in flight and dropped): its cached
        blocks leave the prefix cache; every unfinished request is preempted, keeping its known
        tokens (lost ones are drawn again, same seeds). Rebuilt from `requests`, right even if an
        interrupt left running and waiting half-updated; running requests first."""
        self.kv_cache_manager.forget_cached_blocks(after_step=self.num_finished_steps)
        order = dict.fromkeys([*self.running, *self.waiting, *self.requests.values()])
        self.running, self.waiting = [], deque()
        for request in order:
            if self.requests.get(request.request_id) is not request:  # finished meanwhile
                continue
            self.kv_cache_manager.free(request.block_table)
            request.num_computed_tokens = request.num_output_placeholders = request.num_arrayed = 0
            # An update() cut off may have appended a token to one list only, or not applied its stop.
            request.all_token_ids = request.prompt_token_ids + request.output_token_ids
            if request.output_token_ids and (status := self._stop_status(request, request.output_token_ids[-1])):
                self._finish(request, status)
                continue
            if request.status is RequestStatus.RUNNING:
                request.status = RequestStatus.PREEMPTED
            self.waiting.append(request)
        self.kv_cache_manager.reclaim()  # every request is waiting now: none holds a block
        self.num_finished_steps = self.num_scheduled_steps

    def abort(self, request_id, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> Request:
        """End a request now, at any point, and free its blocks."""
        if (request := self.requests.get(request_id)) is None:
            raise KeyError(f"abort: no unfinished request has request_id {request_id!r}")
        queue = self.running if request.status is RequestStatus.RUNNING else self.waiting
        if request in queue:  # not yet, if an interrupt cut add() short
            queue.remove(request)
        self._finish(request, status)
        return request

    def stop_at_string(self, request: Request, stop: str, num_output_tokens: int) -> None:
        """The engine found stop string `stop` in the request's text (find_stop_string), complete at its
        output token num_output_tokens: it ends there (tokens after it, from accepted drafts, are dropped),
        also if it had just finished otherwise (the string still cuts its text)."""
        del request.output_token_ids[num_output_tokens:]
        del request.all_token_ids[len(request.prompt_token_ids) + num_output_tokens:]
        request.stop_reason = stop
        if request.status.is_finished:
            request.status = RequestStatus.FINISHED_STOPPED
        else:
            self.abort(request.request_id, RequestStatus.FINISHED_STOPPED)

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        """Tokens a running request computes this step: the rest of its prompt (or recompute), or
        its one pending token when decoding; 0 if it is certain to finish once that token arrives
        (a step more would compute a token that is thrown away, or a position >= max_model_len)."""
        num_tokens = request.num_tokens_with_placeholders
        if (len(request.output_token_ids) + request.num_output_placeholders >= _max_tokens(request.sampling_params)
                or num_tokens >= self.max_model_len):
            return 0
        return self._cap(request, num_tokens - request.num_computed_tokens, budget, request.num_computed_tokens)

    def _cost(self, s: ScheduledRequest) -> float:
        """Its share of the budget: its tokens, plus their attention FLOPs counted in tokens of the linear layers'."""
        if self.parity_context is None:
            return s.num_new_tokens
        return s.num_new_tokens * (1 + (s.start + s.num_new_tokens / 2) / self.parity_context)

    def drafting(self) -> bool:
        """Whether the next schedule() proposes drafts: speculation is on and the batch is small enough."""
        spec = self.speculative_config
        return spec is not None and len(self.running) <= spec.disable_by_batch_size and not self.draft_pause

    def _propose_drafts(self, request: Request, num_new_tokens: int, budget: float) -> list[int]:
        """Drafts for a decoding request whose tokens are all known, past min_tokens (its bans would differ per
        draft row); as many as the budget leaves, never past max_tokens or max_model_len."""
        spec, tokens = self.speculative_config, request.all_token_ids
        if (num_new_tokens != 1 or request.num_computed_tokens != len(tokens) - 1 or request.num_output_placeholders
                or len(request.output_token_ids) < request.sampling_params.min_tokens):
            return []
        k = min(self._cap(request, 1 + spec.num_speculative_tokens, budget, len(tokens) - 1) - 1,
                self.max_model_len - len(tokens) - 1,
                _max_tokens(request.sampling_params) - len(request.output_token_ids) - 1)
        if k <= 0:
            return []
        return propose_ngram_drafts(_token_array(request), k, spec.prompt_lookup_min, spec.prompt_lookup_max)

    def _cap(self, request: Request, num_tokens: int, budget: float, start: int) -> int:
        cap = min(num_tokens, self.long_prefill_token_threshold or num_tokens)
        if self.parity_context is None:
            cap = min(cap, budget)
        else:  # the most tokens from `start` whose _cost fits (n^2 / 2P + n(1 + start/P) <= budget); 1 at least
            p = self.parity_context + start
            cap = min(cap, max(1, int(math.sqrt(p * p + 2 * budget * self.parity_context) - p)))
        prompt_len = len(request.prompt_token_ids)
        if request.sampling_params.prompt_logprobs is not None and request.num_computed_tokens < prompt_len:
            # Each prompt row it computes comes out as a row of fp32 logits: about max_num_seqs a step.
            cap = min(cap, max(self.prompt_logprob_rows_left, 1))
        return cap

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, finished: list[Request]) -> bool:
        """Get blocks for the request's new tokens, preempting the most recently admitted running
        requests until they fit. False if the request itself was preempted or can never fit."""
        table, total = request.block_table, request.num_computed_tokens + num_new_tokens
        while not self.kv_cache_manager.allocate(table, request.all_token_ids, total):
            victim = self.running.pop()
            if victim is request and not self.running:  # alone and it still does not fit: never will
                self._finish(request, RequestStatus.FINISHED_ERROR, too_big(total, self.kv_cache_manager))
                finished.append(request)
                return False
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _admit(self, request: Request, budget: int) -> int:
        """Look the request's tokens up in the prefix cache and allocate its first chunk. Returns
        the chunk's size, or 0 (and no change) if its blocks are not free."""
        table = request.block_table
        # A request asking for prompt logprobs computes every prompt position: a hit would skip some.
        wants_every_position = request.sampling_params.prompt_logprobs is not None
        hits = [] if wants_every_position else self.kv_cache_manager.lookup(table, request.all_token_ids)
        num_hit_tokens = len(hits) * self.kv_cache_manager.block_size
        num_new_tokens = self._cap(request, request.num_tokens - num_hit_tokens, budget, num_hit_tokens)
        if not self.kv_cache_manager.allocate(table, request.all_token_ids, num_hit_tokens + num_new_tokens, hits):
            return 0
        if request.status is RequestStatus.WAITING:
            request.num_cached_tokens = num_hit_tokens
        request.status, request.num_computed_tokens = RequestStatus.RUNNING, num_hit_tokens
        return num_new_tokens

    def _advance(self, request: Request, num_new_tokens: int, drafts: list[int] = ()) -> ScheduledRequest:
        # Advanced now, not in update(): the next schedule() may come before this step's tokens.
        start, params = request.num_computed_tokens, request.sampling_params
        request.num_computed_tokens = start + num_new_tokens + len(drafts)
        if params.prompt_logprobs is not None:
            self.prompt_logprob_rows_left -= max(0, min(request.num_computed_tokens, len(request.prompt_token_ids))
                                                 - start)
        banned = None
        if samples_token := (start + num_new_tokens == request.num_tokens_with_placeholders):
            request.num_output_placeholders += 1
            if len(request.output_token_ids) + request.num_output_placeholders <= params.min_tokens:
                # _stop_status would not stop it yet: the sampler bans its stop tokens
                stops = [*params.stop_token_ids, *(() if params.ignore_eos else self.eos_token_ids)]
                banned = [token for token in stops if 0 <= token < self.vocab_size]
        return ScheduledRequest(request, start, num_new_tokens + len(drafts), samples_token, banned, list(drafts))

    def _preempt(self, request: Request) -> None:
        """Preemption by recompute: drop its KV; it keeps its tokens and is prefilled again later
        (the prefix cache may still hold much of it)."""
        self.kv_cache_manager.free(request.block_table)
        request.num_computed_tokens, request.status = 0, RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if len(request.output_token_ids) > params.min_tokens:  # before that the sampler bans them
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if token in self.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= _max_tokens(params) or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        """Mark it finished and free its blocks; the caller has taken it out of running/waiting."""
        request.status, request.error = status, error
        self.kv_cache_manager.free(request.block_table)
        del self.requests[request.request_id]


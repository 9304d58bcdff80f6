"""The engine: the public API and the step loop.

The idea (vLLM V1): each step the scheduler hands a token budget to requests; the engine lays the
scheduled tokens of every request out as ONE flat batch (prefill chunks and decodes mixed), runs
the model once, samples a token for each request that reached the end of its known tokens, and
gives the tokens back to the scheduler. A request is followed from `LLM.generate` to a sampled
token by reading this file top to bottom: generate -> add_request -> step -> _launch
(_prepare_inputs, _run_model, sample) -> _collect.

Owns: LLM, SamplingParams (defined in scheduler.py, which applies its stop fields), RequestOutput,
the step's input tensors, CUDA graphs for decode-only batches, sampling on the device, and async
overlap. Never touches: model internals, kernel internals, block bookkeeping.
"""
import itertools
import random
import sys
import time
from array import array
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

import kv_cache
import model as models
from attention import AttentionMetadata
from scheduler import Request, RequestStatus, SamplingParams, Scheduler, SchedulerOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error"; None while running


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # why the request failed, when finish_reason == "error"


@dataclass
class LiveRequest:
    """The engine's own state of an unfinished request (the scheduler holds the rest)."""
    prompt: str | None
    seed: int                          # SamplingParams.seed, or a draw from the engine's seed
    stream: object | None              # the tokenizer's incremental decoder
    text: list[str] = field(default_factory=list)


@dataclass
class EngineStats:
    """Counters for bench.py: what each step had to read from memory."""
    steps: int = 0
    graph_steps: int = 0
    output_tokens: int = 0
    context_tokens_read: int = 0  # sum over steps of every scheduled request's context length


# ----------------------------------------------------------------------------------------------
# Sampling: one pass over the batch on the device, no host sync.
# ----------------------------------------------------------------------------------------------

@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [rows] float32; 0 = greedy
    top_p: torch.Tensor        # [rows] float32
    top_k: torch.Tensor        # [rows] int32; 0 = off
    seeds: torch.Tensor        # [rows] int32: the noise of each row's draw (see sample)
    all_greedy: bool
    needs_top_k_top_p: bool


def apply_top_k_top_p(logits, top_k, top_p):
    """Mask everything outside each row's top-k, then outside the smallest set whose mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).to(ranks.dtype)
    drop = ranks[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # A token is kept while the mass *before* it is below top_p; the most likely one always stays.
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits, params: SamplingTensors):
    """One token per row: greedy rows take the argmax, the others a draw from softmax(logits / T).

    The Gumbel-max trick: argmax(logits / T + G), G = -log(-log(U)) with U uniform, is a draw from
    softmax(logits / T), so sampling is one pass over the vocabulary with no softmax, cumsum or
    search. Each row's U comes from its own seed, derived from the request's seed and the index of
    the token being drawn, so a seeded request draws the same tokens alone or in any batch."""
    if params.all_greedy:
        return logits.argmax(-1)
    temperature = params.temperature
    if params.needs_top_k_top_p:  # rare: sort-based masking on logits / T, then draw at T = 1
        sampled = temperature > 0
        logits = apply_top_k_top_p(logits / torch.where(sampled, temperature, 1.0)[:, None],
                                   params.top_k, params.top_p)
        temperature = sampled.float()
    draw = gumbel_argmax if logits.is_cuda else gumbel_argmax_reference
    return draw(logits, temperature, params.seeds)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temperature_ptr, seeds_ptr, out_ptr, vocab_size, stride_row,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    best_value = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    for start in range(0, vocab_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride_row + offsets, mask=offsets < vocab_size, other=float("-inf"))
        x = x.to(tl.float32)
        if temperature > 0:
            gumbel = -tl.log(-tl.log(tl.rand(seed, offsets)))  # U = 0 gives -inf: never chosen
            x = x / temperature + gumbel
        block_best = tl.max(x, axis=0)
        block_index = tl.argmax(x, axis=0) + start
        better = block_best > best_value  # strict: ties keep the lowest index, as torch.argmax
        best_index = tl.where(better, block_index, best_index)
        best_value = tl.where(better, block_best, best_value)
    tl.store(out_ptr + row, best_index)


def gumbel_argmax(logits, temperature, seeds):
    """argmax(logits / T + Gumbel noise) per row (T = 0: plain argmax), one read of the logits."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        block = min(4096, triton.next_power_of_2(logits.shape[1]))
        _gumbel_argmax_kernel[(logits.shape[0],)](logits, temperature, seeds, out, logits.shape[1],
                                                  logits.stride(0), BLOCK=block, num_warps=8)
    return out


def gumbel_argmax_reference(logits, temperature, seeds):
    """gumbel_argmax in plain torch (the noise comes from torch's generator, not Triton's)."""
    out = logits.argmax(-1)
    for row in (temperature > 0).nonzero().flatten().tolist():
        generator = torch.Generator(logits.device).manual_seed(int(seeds[row]))
        uniform = torch.rand(logits.shape[1], generator=generator, device=logits.device)
        out[row] = (logits[row].float() / temperature[row] - torch.log(-torch.log(uniform))).argmax()
    return out


# ----------------------------------------------------------------------------------------------
# The input buffer: every step's integers go to the device in ONE copy.
# ----------------------------------------------------------------------------------------------

class InputLayout:
    """Fixed offsets of each field in one int32 buffer (floats are stored bit-cast).

    Fixed offsets make the device-side views static, so a CUDA graph captured on them can be
    replayed after each step's copy. The block table comes last, so a step copies only the prefix
    that holds its rows.
    """

    def __init__(self, max_tokens, max_seqs, max_blocks_per_seq):
        sizes = dict(input_ids=max_tokens, positions=max_tokens, slot_mapping=max_tokens,
                     query_start_loc=max_seqs + 1, seq_lens=max_seqs, logits_indices=max_seqs,
                     temperature=max_seqs, top_p=max_seqs, top_k=max_seqs, seeds=max_seqs,
                     placeholder_dst=max_seqs, placeholder_src=max_seqs)
        self.offset, end = {}, 0
        for name, size in sizes.items():
            self.offset[name], end = end, end + size
        self.block_table = end
        self.width = max_blocks_per_seq
        self.size = self.block_table + max_seqs * max_blocks_per_seq

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
    sampling: SamplingTensors | None = None


@dataclass
class InFlight:
    """A launched step whose sampled tokens may still be on their way to the host."""
    plan: StepPlan
    sampled: torch.Tensor       # [num_sampling] int64 on the device
    sampled_host: torch.Tensor  # pinned host copy
    ready: torch.cuda.Event | None


# ----------------------------------------------------------------------------------------------
# LLM
# ----------------------------------------------------------------------------------------------

class LLM:
    def __init__(self, model: str, *, dtype=None, device=None, block_size: int = 16,
                 max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 async_scheduling: bool = True, enforce_eager: bool = False, seed: int = 0,
                 num_blocks: int | None = None, long_prefill_token_threshold: int = 0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda:  # streams, events and graphs below use the current device: make it ours
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        _check_engine_args(block_size, max_num_batched_tokens, max_num_seqs, gpu_memory_utilization)
        if model in models.SHAPES:  # random weights of a named shape: no tokenizer, prompts are ids
            self.model, self.tokenizer = models.random_model(model, dtype, self.device, seed=seed), None
        else:
            self.model, self.tokenizer = models.load_model(model, dtype, self.device), _tokenizer_or_none(model)
        config = self.model.config
        self.max_model_len = config.max_position_embeddings if max_model_len is None else max_model_len
        if not 2 <= self.max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len}: must be in [2, "
                             f"{config.max_position_embeddings}] (the model's max_position_embeddings)")
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.async_scheduling = async_scheduling
        self.rng = random.Random(seed)  # seeds of requests that bring none
        self.vocab_size = self.model.config.vocab_size

        # A decode batch padded up to its graph size can hold more tokens than the budget.
        max_batch_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.layout = InputLayout(max_batch_tokens, max_num_seqs, -(-self.max_model_len // block_size))
        self.graph_sizes = [] if not self.on_cuda or enforce_eager else _graph_ladder(max_num_seqs)
        self.device_buffer = torch.zeros(self.layout.size, dtype=torch.int32, device=self.device)
        # Two host buffers: while step N's copy may still be pending, step N+1 fills the other one.
        self.host_buffers = [torch.zeros(self.layout.size, dtype=torch.int32, pin_memory=self.on_cuda)
                             for _ in range(2)]
        self.zeros = [0] * self.layout.width  # padding for block-table rows
        self.sampled_host = [torch.zeros(max_num_seqs, dtype=torch.int64, pin_memory=self.on_cuda)
                             for _ in range(2)]

        per_block = kv_cache.kv_cache_bytes_per_block(config.num_layers, block_size, config.num_kv_heads,
                                                      config.head_dim, self.model.dtype)
        if num_blocks is None:
            # Never more than every sequence at full length can use: more blocks could only keep
            # more finished prefixes cached, and the pool keeps a Python object per block.
            useful = max_num_seqs * self.layout.width
            num_blocks = min(useful, self._profile_num_blocks(per_block, gpu_memory_utilization) if self.on_cuda
                             else (1 << 30) // per_block)  # CPU: at most 1 GiB of cache
        kv_cache.check_kv_capacity(num_blocks, block_size, self.max_model_len)
        self.kv_cache = kv_cache.allocate_kv_cache(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                                                   config.head_dim, self.model.dtype, self.device)
        self.scheduler = Scheduler(num_blocks=num_blocks, block_size=block_size,
                                   enable_prefix_caching=enable_prefix_caching,
                                   max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                   max_model_len=self.max_model_len, vocab_size=config.vocab_size,
                                   eos_token_ids=self._eos_token_ids(),
                                   long_prefill_token_threshold=long_prefill_token_threshold)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.graph_sizes:
            self._capture_graphs()
        self.in_flight: InFlight | None = None
        self.step_count = 0
        self.stats = EngineStats()
        self.live: dict[str, LiveRequest] = {}
        self.request_ids = itertools.count()

    # ---- public API ---------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in input order. One bad prompt fails alone:
        its output has finish_reason "error" and `error` says why, the others finish."""
        prompts = _as_prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: got {len(sampling_params)} for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        order, results = [], {}
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = self._new_request_id()
                order.append(request_id)
                try:
                    self.add_request(request_id, prompt, params)
                except ValueError as error:
                    results[request_id] = _error_output(request_id, prompt, str(error))
            pending = set(order) - set(results)
            progress = _Progress(len(order), self.stats, enabled=use_tqdm and sys.stderr.isatty())
            while self.has_unfinished_requests():
                for output in self._step(report_running=False):
                    if output.request_id in pending:
                        results[output.request_id] = output
                progress.update(len(results))
            progress.close()
        except BaseException:
            for request_id in order:  # never leave blocks owned by requests nobody will read
                self.abort(request_id)
            raise
        return [results[request_id] for request_id in order]

    def _new_request_id(self) -> str:
        """generate()'s ids: numbers, skipping any that add_request's callers already use."""
        request_id = str(next(self.request_ids))
        while request_id in self.live:
            request_id = str(next(self.request_ids))
        return request_id

    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None) -> None:
        """Queue one request. Raises ValueError naming what is wrong with it."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        params.validate()  # again: its fields may have been changed since it was made
        text, token_ids = self._tokenize(prompt)
        self.scheduler.add(Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params))
        seed = params.seed if params.seed is not None else self.rng.getrandbits(31)
        stream = self.tokenizer.stream(skip_special_tokens=True) if self.tokenizer else None
        self.live[request_id] = LiveRequest(text, seed, stream)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns an output for every request that got a token or finished."""
        return self._step(report_running=True)

    def _step(self, report_running: bool) -> list[RequestOutput]:
        try:
            return self._step_or_raise(report_running)
        except Exception:
            # A step that failed half-way leaves placeholders no token will fill: end every request
            # so no block leaks and the engine stays usable, then let the caller see the error.
            self.in_flight = None
            for request_id in list(self.scheduler.requests):
                self.abort(request_id)
            raise

    def _step_or_raise(self, report_running: bool) -> list[RequestOutput]:
        """With async scheduling this launches step N+1 *before* waiting for step N's tokens, so the
        CPU's scheduling and input building hide behind the GPU's forward pass."""
        schedule = self.scheduler.schedule()
        launched = self._launch(schedule) if schedule.scheduled else None
        outputs = [self._output(request) for request in schedule.finished]
        if self.async_scheduling:
            previous, self.in_flight = self.in_flight, launched
            if previous is not None:
                outputs += self._collect(previous, report_running)
        elif launched is not None:
            outputs += self._collect(launched, report_running)
        if launched is None and not outputs and self.in_flight is None and self.has_unfinished_requests():
            raise RuntimeError("the scheduler made no progress with requests waiting: this is a bug")
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; its final output, or None if it had already ended."""
        if request_id not in self.scheduler.requests:
            self.live.pop(request_id, None)
            return None
        return self._output(self.scheduler.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.in_flight is not None

    # ---- one step -----------------------------------------------------------------------------

    def _launch(self, schedule: SchedulerOutput) -> InFlight:
        plan = self._prepare_inputs(schedule)
        logits = self._run_model(plan)
        sampled = sample(logits, plan.sampling)
        host = self.sampled_host[self.step_count % 2][: plan.num_sampling]
        host.copy_(sampled, non_blocking=True)
        ready = None
        if self.on_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self.step_count += 1
        self.stats.steps += 1
        return InFlight(plan, sampled, host, ready)

    def _prepare_inputs(self, schedule: SchedulerOutput) -> StepPlan:
        """Lay the step's requests out as one flat batch in the host buffer, then copy it once.

        This runs on the CPU for every step, so it is written for speed: plain lists, a short path
        for decodes (one token each), and one array -> tensor conversion per field."""
        block_size = self.block_size
        previous_rows = self.in_flight.plan.sample_row if self.in_flight is not None else {}
        input_ids, positions, slots, query_start, seq_lens, logits_indices = [], [], [], [0], [], []
        temperature, top_p, top_k, seeds, sample_row = [], [], [], [], {}
        placeholder_dst, placeholder_src, tables = [], [], []
        for entry in schedule.scheduled:
            request, start = entry.request, entry.start
            end = start + entry.num_new_tokens
            known = request.num_tokens
            blocks = request.block_ids
            if end > known:
                # The newest token was sampled by the step still in flight: it is read on the device.
                assert end == known + 1, "only a request's newest token may be a placeholder"
                input_ids += request.all_token_ids[start:known]
                placeholder_dst.append(len(input_ids))
                placeholder_src.append(previous_rows[request.request_id])
                input_ids.append(0)
            else:
                input_ids += request.all_token_ids[start:end]
            if end - start == 1:
                positions.append(start)
                slots.append(blocks[start // block_size] * block_size + start % block_size)
            else:
                positions += range(start, end)
                slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
            query_start.append(len(input_ids))
            seq_lens.append(end)
            tables.append(blocks[: -(-end // block_size)])
            if entry.samples:
                params = request.sampling_params
                sample_row[request.request_id] = len(logits_indices)
                # The noise of the k-th token a request draws depends on (its seed, k) alone.
                index = len(request.output_token_ids) + request.num_output_placeholders
                seeds.append(hash((self.live[request.request_id].seed, index)) & 0x7FFFFFFF)
                logits_indices.append(len(input_ids) - 1)
                temperature.append(params.temperature if params.temperature >= 1e-5 else 0.0)  # vLLM's eps
                top_p.append(params.top_p)
                top_k.append(params.top_k if 0 < params.top_k < self.vocab_size else 0)
        num_tokens, num_seqs = len(input_ids), len(seq_lens)
        max_query_len = max(b - a for a, b in zip(query_start, query_start[1:]))
        rows = num_seqs
        if max_query_len == 1 and self.graphs:
            rows = next((size for size in self.graphs if size >= num_seqs), num_seqs)
            pad = rows - num_seqs  # padding rows: no token written, no key read (seq_len 0)
            input_ids += [0] * pad
            positions += [0] * pad
            slots += [-1] * pad
            query_start += range(num_seqs + 1, rows + 1)
            seq_lens += [0] * pad
            num_tokens = rows

        self._copy_to_device(rows, tables, dict(
            input_ids=input_ids, positions=positions, slot_mapping=slots, query_start_loc=query_start,
            seq_lens=seq_lens, logits_indices=logits_indices, top_k=top_k, seeds=seeds, temperature=temperature,
            top_p=top_p, placeholder_dst=placeholder_dst, placeholder_src=placeholder_src))
        layout, device = self.layout, self.device_buffer
        if placeholder_dst:
            dst = layout.view(device, "placeholder_dst", len(placeholder_dst)).long()
            src = layout.view(device, "placeholder_src", len(placeholder_src)).long()
            tokens = self.in_flight.sampled.index_select(0, src).to(torch.int32)
            layout.view(device, "input_ids", num_tokens).index_copy_(0, dst, tokens)
        num_sampling = len(logits_indices)
        sampling = SamplingTensors(
            temperature=layout.view(device, "temperature", num_sampling).view(torch.float32),
            top_p=layout.view(device, "top_p", num_sampling).view(torch.float32),
            top_k=layout.view(device, "top_k", num_sampling),
            seeds=layout.view(device, "seeds", num_sampling),
            all_greedy=not any(temperature),
            needs_top_k_top_p=any(top_k) or any(p < 1 for p in top_p))
        self.stats.context_tokens_read += sum(seq_lens)
        return StepPlan(schedule, num_tokens, rows, num_sampling, max_query_len, max(seq_lens),
                        sample_row, sampling)

    def _copy_to_device(self, rows, tables, fields):
        """Write every field into this step's pinned host buffer, then copy the used prefix once."""
        host, layout = self.host_buffers[self.step_count % 2], self.layout
        for name, values in fields.items():
            if values:
                as_bits = array("f" if name in ("temperature", "top_p") else "i", values)
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
                layout.view(buffer, "positions", num_tokens).long(), self.kv_cache, meta, logits_indices)

    def _run_model(self, plan: StepPlan) -> torch.Tensor:
        """Logits for the sampling rows: a graph replay for decode-only batches, else eager."""
        if plan.num_rows in self.graphs and plan.max_query_len == 1:
            graph, logits = self.graphs[plan.num_rows]
            graph.replay()
            self.stats.graph_steps += 1
            if plan.num_sampling == plan.num_rows:
                return logits[: plan.num_sampling]
            indices = self.layout.view(self.device_buffer, "logits_indices", plan.num_sampling).long()
            return logits.index_select(0, indices)
        with torch.inference_mode():
            return self.model(*self._model_inputs(plan.num_tokens, plan.num_rows, plan.max_query_len,
                                                  plan.max_seq_len, plan.num_sampling))

    def _collect(self, flight: InFlight, report_running: bool) -> list[RequestOutput]:
        """Wait for a step's tokens, hand them to the scheduler, report who moved."""
        if flight.ready is not None:
            flight.ready.synchronize()
        tokens = flight.sampled_host.tolist()
        entries = [entry for entry in flight.plan.schedule.scheduled if entry.samples]
        lengths = [len(entry.request.output_token_ids) for entry in entries]
        finished = self.scheduler.update(flight.plan.schedule, tokens)
        moved = [entry.request for entry, n in zip(entries, lengths) if len(entry.request.output_token_ids) > n]
        self.stats.output_tokens += len(moved)
        if self.tokenizer is not None:  # incremental detokenization: O(1) per token
            for request in moved:
                live = self.live[request.request_id]
                token = request.output_token_ids[-1]
                # The token that stopped a request and ids past the tokenizer's vocabulary (padded
                # embedding rows) have no text.
                if request.status is not RequestStatus.FINISHED_STOPPED and token < self.tokenizer.vocab_size:
                    live.text.append(live.stream.push(token))
        if not report_running:
            return [self._output(request) for request in finished]
        moved_ids = {request.request_id for request in moved}
        return [self._output(request) for request in moved + [r for r in finished if r.request_id not in moved_ids]]

    # ---- helpers ------------------------------------------------------------------------------

    def _output(self, request: Request) -> RequestOutput:
        finished = request.status.is_finished
        live = self.live.pop(request.request_id) if finished else self.live[request.request_id]
        if finished and live.stream is not None:
            live.text.append(live.stream.finish())
        completion = CompletionOutput(0, "".join(live.text), list(request.output_token_ids), request.finish_reason)
        return RequestOutput(request.request_id, live.prompt, request.prompt_token_ids, [completion], finished,
                             request.num_cached_tokens, request.error)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _as_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has random weights and no tokenizer; pass token ids "
                                 "(a list of ints or {'prompt_token_ids': [...]})")
            return prompt, self.tokenizer.encode(prompt)
        return None, _as_token_ids(prompt)

    def _eos_token_ids(self) -> list[int]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return list(self.tokenizer.eos_token_ids)
        return list(self.model.config.eos_token_ids)

    def _profile_num_blocks(self, bytes_per_block, gpu_memory_utilization):
        """Run the largest step the engine can schedule and size the cache from the memory left."""
        config = self.model.config
        num_tokens = self.max_num_batched_tokens
        num_seqs = min(self.max_num_seqs, num_tokens)
        per_seq = min(-(-num_tokens // num_seqs), self.max_model_len)
        num_seqs = -(-num_tokens // per_seq)
        blocks_per_seq = -(-per_seq // self.block_size)
        scratch = kv_cache.allocate_kv_cache(config.num_layers, num_seqs * blocks_per_seq, self.block_size,
                                             config.num_kv_heads, config.head_dim, self.model.dtype, self.device)
        lengths = [per_seq] * (num_tokens // per_seq) + ([num_tokens % per_seq] if num_tokens % per_seq else [])
        starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        table = torch.arange(len(lengths) * blocks_per_seq, dtype=torch.int32, device=self.device)
        table = table.view(len(lengths), blocks_per_seq)
        slots = (table.long() * self.block_size).repeat_interleave(self.block_size, 1)
        slots = slots + torch.arange(self.block_size, device=self.device).repeat(blocks_per_seq)
        slot_mapping = torch.cat([slots[i, :n] for i, n in enumerate(lengths)])
        meta = AttentionMetadata(slot_mapping, starts, torch.tensor(lengths, dtype=torch.int32, device=self.device),
                                 table, max(lengths), max(lengths))
        rows = min(self.max_num_seqs, num_tokens)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            logits = self.model(torch.zeros(num_tokens, dtype=torch.long, device=self.device), positions,
                                scratch, meta, torch.arange(rows, device=self.device))
            full = torch.ones(rows, device=self.device)
            ints = torch.full((rows,), 5, dtype=torch.int32, device=self.device)
            sample(logits, SamplingTensors(full, full * 0.5, ints, ints, False, True))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        # Each decode graph keeps its own fp32 logits alive after capture, which comes after this.
        peak += sum(self.graph_sizes) * config.vocab_size * 4
        del scratch, logits
        torch.cuda.empty_cache()
        return kv_cache.num_blocks_from_memory(bytes_per_block, gpu_memory_utilization, peak, self.device)

    def _capture_graphs(self):
        """One CUDA graph per decode batch size of a ladder; a batch is padded up to the next size.

        Without graphs a small model's decode step costs more in kernel launches than in work."""
        sizes = self.graph_sizes
        buffer, layout = self.device_buffer, self.layout
        layout.view(buffer, "slot_mapping", sizes[-1]).fill_(-1)      # capture writes no KV
        layout.view(buffer, "query_start_loc", sizes[-1] + 1).copy_(torch.arange(sizes[-1] + 1))
        layout.view(buffer, "seq_lens", sizes[-1]).fill_(1)
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first: smaller graphs reuse its scratch memory
                inputs = self._model_inputs(size, size, 1, self.max_model_len, None)
                self.model(*inputs)  # compiles the kernels for this shape outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model(*self._model_inputs(size, size, 1, self.max_model_len, None))
                pool = graph.pool()
                self.graphs[size] = (graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()


def _graph_ladder(max_num_seqs):
    """Decode batch sizes with a CUDA graph: 1, 2, 4, then every multiple of 8 (padding wastes < 8 rows)."""
    return sorted({size for size in (1, 2, 4, *range(8, max_num_seqs + 1, 8), max_num_seqs) if size <= max_num_seqs})


def _tokenizer_or_none(path):
    """A checkpoint without tokenizer files still runs, on token-id prompts only."""
    try:
        return models.load_tokenizer(path)
    except FileNotFoundError:
        return None


def _check_engine_args(block_size, max_num_batched_tokens, max_num_seqs, gpu_memory_utilization):
    kv_cache.check_block_size(block_size)
    if not (isinstance(max_num_batched_tokens, int) and max_num_batched_tokens >= 1):
        raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens!r}: must be an int >= 1")
    if not (isinstance(max_num_seqs, int) and max_num_seqs >= 1):
        raise ValueError(f"max_num_seqs={max_num_seqs!r}: must be an int >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r}: must be in (0, 1]")


def _as_token_ids(ids) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"prompt: expected a string, a list of token ids or a dict, got {type(ids).__name__} "
                         f"{str(ids)[:40]}")
    return list(ids)


def _as_prompt_list(prompts) -> list:
    """One prompt (a string, a list of ids, a dict) or a list of them."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    return prompts


def _error_output(request_id, prompt, message) -> RequestOutput:
    if isinstance(prompt, dict):
        prompt, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
    else:
        ids = prompt
    text = prompt if isinstance(prompt, str) else None
    ids = list(ids) if isinstance(ids, (list, tuple)) and all(isinstance(i, int) for i in ids) else []
    return RequestOutput(request_id, text, ids, [CompletionOutput(0, "", [], "error")], True, 0, message)


class _Progress:
    """A one-line progress report on a terminal (requests done, output tokens/s)."""

    def __init__(self, total, stats, enabled):
        self.total, self.stats, self.enabled = total, stats, enabled
        self.first_tokens = stats.output_tokens
        self.start = self.last = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or done == self.total):
            self.last = now
            rate = (self.stats.output_tokens - self.first_tokens) / max(now - self.start, 1e-9)
            sys.stderr.write(f"\rProcessed {done}/{self.total} requests | {rate:,.0f} output tok/s")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")

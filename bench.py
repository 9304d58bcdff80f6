"""Throughput benchmark: nano-vllm's offline workload, timed, against the memory-bandwidth limit.

    python bench.py                      # GPU: Qwen3-0.6B shape, 256 requests; CPU: tiny shape, small workload
    python bench.py --arch llama3-8b
    python bench.py --workload shared-prefix --json out.json
    python bench.py --timeline           # steps bucketed by requests per step, against their limits
    python bench.py --kernel [--sweep]   # the paged-attention kernel alone (GPU)
    python bench.py --latency            # batch-1 decode: ms per step at a 1k-token context
    python bench.py --workload chat --through-server   # the same requests as HTTP streams to server.py
    python bench.py --speculative-ngram 4  # speculative decoding with up to 4 n-gram drafts a step

Decoding is memory-bound: each step must read every weight once plus the K/V of every running
request's context. The engine counts those contexts, so the run's bytes over the measured
device-to-device copy bandwidth give the fastest the run could possibly have gone.
"""
import argparse
import bisect
import concurrent.futures
import dataclasses
import functools
import gc
import http.client
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import random
import time

import torch
import triton

import kv_cache
import model
from attention import FP8, AttentionMetadata, LaunchConfig, choose_launch_config, paged_attention
from engine import LLM, SamplingParams


WORKLOADS = ["default", "shared-prefix", "long-prompt", "chat", "chat-multiturn", "mixed", "short"]
ONLINE_WORKLOADS = ("chat", "chat-multiturn", "mixed", "short")  # served as a client sees them: arrivals, latencies
TURNS = 4  # chat-multiturn: each conversation asks this many questions, one after the other
QUESTION_LEN = (32, 256)  # chat questions; answers are 128-512 tokens (within --max-output-len)


def make_workload(name, num_seqs, max_input_len, max_output_len, vocab_limit=10000, seed=0):
    """The prompts and SamplingParams of a workload, deterministic for a seed. `default` is nano-vllm's
    exactly (seed 0, prompts first, then each max_tokens). `chat`: one system prompt of max_input_len
    tokens shared by all, a question each. `chat-multiturn`: conversations of TURNS requests i, i+1, ...
    (i a multiple of TURNS); the first is a chat request, each later one holds only its new question (see
    follow_ups). `mixed`: chats, and one request in 16 a document of max_input_len / 4 to max_input_len
    tokens. `short`: 16 prompt and 16 output tokens."""
    random.seed(seed)

    def tokens(n):
        return [random.randint(0, vocab_limit) for _ in range(n)]

    def question():
        return tokens(random.randint(min(QUESTION_LEN[0], max_input_len), min(QUESTION_LEN[1], max_input_len)))
    answer_len = (min(100, max_output_len), max_output_len)
    if name == "default":
        prompts = [tokens(random.randint(min(100, max_input_len), max_input_len)) for _ in range(num_seqs)]
    elif name == "shared-prefix":  # one long system prompt, short distinct questions: prefix-cache hits
        prefix = tokens(max_input_len)
        prompts = [prefix + tokens(random.randint(16, 64)) for _ in range(num_seqs)]
    elif name == "long-prompt":  # prefill-heavy: long prompts, short answers
        prompts = [tokens(max_input_len) for _ in range(num_seqs)]
        answer_len = (min(100, max_output_len, 128), min(max_output_len, 128))
    elif name in ("chat", "chat-multiturn"):
        system = tokens(max_input_len)
        prompts = [question() if name == "chat-multiturn" and i % TURNS else system + question()
                   for i in range(num_seqs)]
    elif name == "mixed":
        prompts = [tokens(random.randint(max(1, max_input_len // 4), max_input_len)) if random.random() < 1 / 16
                   else question() for _ in range(num_seqs)]
    elif name == "short":
        prompts = [tokens(min(16, max_input_len)) for _ in range(num_seqs)]
    else:
        raise ValueError(f"workload {name!r}: expected one of {', '.join(WORKLOADS)}")
    if name in ("chat", "chat-multiturn", "mixed"):
        answer_len = (min(128, max_output_len), min(512, max_output_len))
    elif name == "short":
        answer_len = (min(16, max_output_len),) * 2
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(*answer_len))
              for _ in range(num_seqs)]
    return prompts, params


def longest_sequence(workload, max_input_len, max_output_len):
    """The most tokens (prompt and output) one request of make_workload's workload holds: the engine's max_model_len."""
    question = min(QUESTION_LEN[1], max_input_len)
    extra = {"shared-prefix": 64, "chat": question, "chat-multiturn": TURNS * question + (TURNS - 1) * max_output_len}
    return max_input_len + extra.get(workload, 0) + max_output_len


def arrival_times(num_requests, request_rate, seed=0):
    """When each request arrives, in seconds from the start: a Poisson process of request_rate per
    second (exponential gaps), or all at once when request_rate is None."""
    if request_rate is None:
        return [0.0] * num_requests
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(num_requests):
        now += rng.expovariate(request_rate)
        times.append(now)
    return times


def follow_ups(workload, num_requests):
    """chat-multiturn: request i -> the next turn of its conversation (see serve)."""
    if workload != "chat-multiturn":
        return {}
    return {i: i + 1 for i in range(num_requests - 1) if (i + 1) % TURNS}


def serve(llm, prompts, params, arrivals, next_turn=None):
    """Serve the requests as a client would: each is added once its arrival time has passed on a real
    clock, the engine is stepped, and the time each streamed token reaches the client is noted.
    next_turn (request i -> j): j arrives when i finishes, its prompt then i's prompt + i's answer +
    j's own question, as a chat client sends the whole conversation each turn; prompts[j] and
    arrivals[j] are updated in place. Returns, per request, its token times (seconds from the start),
    and the wall time."""
    start, next_turn = time.perf_counter(), next_turn or {}
    later = set(next_turn.values())
    order = sorted((i for i in range(len(prompts)) if i not in later), key=arrivals.__getitem__)
    token_times = [[] for _ in prompts]
    ids = [f"online-{i}" for i in range(len(prompts))]
    waiting = 0
    while waiting < len(order) or llm.has_unfinished_requests():  # (a next turn is added with the step's outputs)
        now = time.perf_counter() - start
        while waiting < len(order) and arrivals[order[waiting]] <= now:
            i = order[waiting]
            llm.add_request(ids[i], prompts[i], params[i])
            waiting += 1
        if not llm.has_unfinished_requests():
            time.sleep(arrivals[order[waiting]] - now)
            continue
        for output in llm.step():
            i, count = int(output.request_id.split("-")[1]), len(output.outputs[0].token_ids)
            if output.outputs[0].finish_reason == "error":
                raise SystemExit(f"request {i} failed: {output.error}")
            token_times[i] += [time.perf_counter() - start] * (count - len(token_times[i]))
            if output.finished and i in next_turn:
                j = next_turn[i]
                prompts[j] = prompts[i] + output.outputs[0].token_ids + prompts[j]
                arrivals[j] = time.perf_counter() - start
                llm.add_request(ids[j], prompts[j], params[j])
    return token_times, time.perf_counter() - start


def serve_through_server(llm, prompts, params, arrivals):
    """serve()'s requests as a client of server.py sends them, on 127.0.0.1 (a free port): its engine loop on a thread
    of this process and its HTTP front end in a process of its own, as `python server.py` runs them; the load
    generator in a third process, so that the client's work never holds the server's interpreter lock. Each
    request is a streamed POST /v1/completions of token ids whose fields map back to exactly its SamplingParams.
    Returns the client's clock start (perf_counter), the token times and the wall time, as serve() does."""
    import server
    bodies, defaults = [], llm.get_default_sampling_params()
    for prompt, p in zip(prompts, params):
        body = dict({name: getattr(p, name) for name in server.PASSED_FIELDS}, prompt=prompt, max_tokens=p.max_tokens,
                    stop=p.stop, logprobs=p.logprobs, stream=True, stream_options={"include_usage": True},
                    return_token_ids=True)  # (a chunk may carry several tokens: the server merges when behind)
        if server.sampling_params(body, defaults, p.max_tokens, p.logprobs, "logprobs") != p:  # a field it drops
            raise SystemExit(f"--through-server: {p} is not what the server makes of {body}")
        bodies.append(body)
    running = server.Server(llm, "bench", log_level="warning")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
            start, token_times, usages, seconds = client.submit(replay_over_http, running.port, bodies,
                                                                arrivals).result()
    finally:  # the front end stops, then the engine loop: nothing is left running
        running.close()
    for i, usage in enumerate(usages):  # the server's counts: the prompt it got, and the tokens the chunks carried
        if usage is None or (usage["prompt_tokens"], usage["completion_tokens"]) != (len(prompts[i]),
                                                                                     len(token_times[i])):
            raise SystemExit(f"--through-server: request {i} of {len(prompts[i])} prompt tokens got "
                             f"{len(token_times[i])} tokens; the server counted {usage}")
    return start, token_times, seconds


def replay_over_http(port, bodies, arrivals):
    """The load generator (in its own process): each request POSTed at its arrival time, on a thread of its own,
    and its stream read as it comes; each chunk's token ids say how many tokens came with it. Returns the clock's
    start (perf_counter: the system's monotonic clock, the same in every process), each request's token times and
    its usage (the server's counts), and the wall time."""
    start, token_times, usages = time.perf_counter(), [[] for _ in bodies], [None] * len(bodies)

    def request(i):
        time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            connection.request("POST", "/v1/completions", json.dumps(bodies[i]), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"request {i}: HTTP {response.status}: {response.read().decode()}")
            for line in response:  # server-sent events: "data: {chunk}" lines, blank lines, "data: [DONE]"
                now = time.perf_counter() - start
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"request {i} failed: {chunk['error']['message']}")
                if chunk["choices"]:
                    token_times[i] += [now] * len(chunk["choices"][0]["token_ids"])
                else:  # the last chunk: the usage alone
                    usages[i] = chunk["usage"]
        finally:
            connection.close()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(request, range(len(bodies))))  # (re-raises a request's error)
    return start, token_times, usages, time.perf_counter() - start


def latency_table(token_times, arrivals, classes):
    """Per request class: time to first token and inter-token latency (p50, p90, p99), in ms."""
    def percentiles(values):
        values = sorted(values)
        return [round(1e3 * values[min(len(values) - 1, int(q * len(values)))], 2) if values else None
                for q in (0.5, 0.9, 0.99)]
    table = {}
    for name in sorted(set(classes)):
        members = [i for i, c in enumerate(classes) if c == name]
        ttft = [token_times[i][0] - arrivals[i] for i in members if token_times[i]]
        itl = [b - a for i in members for a, b in zip(token_times[i], token_times[i][1:])]
        table[name] = dict(requests=len(members), ttft_ms_p50_p90_p99=percentiles(ttft),
                           itl_ms_p50_p90_p99=percentiles(itl))
    return table


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy: the ceiling we compare with."""
    source = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    # Eager: a copy captured in a CUDA graph may run on the copy engines (2.8 TB/s seen), not the SMs.
    us = triton.testing.do_bench(lambda: target.copy_(source), warmup=10, rep=60, return_mode="median") * 1e3
    return 2 * source.numel() * source.element_size() / (us * 1e-6)


def matmul_rate(fp8=False):
    """FLOP/s of a large bf16 matrix product (random data), or with fp8: of the e4m3 product with row-wise scales
    that fp8 weights run (torch._scaled_mm): the arithmetic ceiling we compare with."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    if fp8:
        a, b, ones = a.to(FP8), b.to(FP8), torch.ones(8192, 1, device="cuda")
        ms = triton.testing.do_bench(lambda: torch._scaled_mm(a, b.t(), ones, ones.t(), out_dtype=torch.bfloat16),
                                     warmup=10, rep=60, return_mode="median")
    else:
        ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=60, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3)


def record_gpu_spans(llm):
    """CUDA events around each step's device work: recorded when the step's forward is launched (its
    inputs already built on the host) and when its sampling is. Summed, the spans over the wall time
    are the share of time the GPU was busy (an upper bound: gaps between an eager step's launches
    count as busy). An empty list without a GPU."""
    spans, run_model, execute = [], llm.runner.run_model, llm.runner.execute
    if not llm.runner.on_cuda:
        return spans

    def timed_run_model(*shape):
        spans.append([torch.cuda.Event(enable_timing=True)])
        spans[-1][0].record()
        return run_model(*shape)

    def timed_execute(schedule, previous):
        flight = execute(schedule, previous)
        spans[-1].append(torch.cuda.Event(enable_timing=True))
        spans[-1][1].record()
        return flight
    llm.runner.run_model, llm.runner.execute = timed_run_model, timed_execute
    return spans


def record_steps(llm):
    """Note, per step, when its tokens reached the host and what it computed: (time, requests,
    context tokens read, new tokens, sampled rows, attention key-query pairs). With async overlap the
    time between two notes is one step's wall time."""
    steps, collect = [], llm._collect

    def timed_collect(flight):
        outputs = collect(flight)
        entries = flight.plan.schedule.scheduled
        steps.append((time.perf_counter(), len(entries), sum(e.start + e.num_new_tokens for e in entries),
                      sum(e.num_new_tokens for e in entries), flight.plan.num_sampling,
                      sum(e.num_new_tokens * (e.start + (e.num_new_tokens + 1) / 2) for e in entries)))
        return outputs
    llm._collect = timed_collect
    return steps


def step_limits(llm, step, bandwidth, flops_rate, layer_flops_rate=None):
    """One step's byte limit (every weight once plus its K/V context, over the copy bandwidth) and
    roofline limit: the sum over its two phases of the larger of bytes and FLOPs over the measured
    matmul rate. The matmuls stream the weights and compute every new token (lm_head: only the
    sampled rows); attention streams the K/V context and computes QK and PV. A step mixing long
    prompts with decodes is bound by the matmuls' FLOPs and the decodes' K/V bytes, one after the other."""
    c = llm.runner.model.config
    _, _, context, new_tokens, sampled, pairs = step
    per_token = kv_cache.kv_cache_bytes_per_block(c.num_layers, 1, c.num_kv_heads, c.head_dim,
                                                  llm.runner.kv_cache_dtype)
    weight_seconds, kv_seconds = _weight_bytes(llm) / bandwidth, context * per_token / bandwidth
    q = c.num_q_heads * c.head_dim
    # the layers' matmuls at layer_flops_rate (fp8 weights: the fp8 rate), lm_head at the bf16 rate
    matmul_seconds = (2 * c.num_layers * c.layer_weights * new_tokens / (layer_flops_rate or flops_rate)
                      + 2 * c.vocab_size * c.hidden_size * sampled / flops_rate)
    roofline = (max(weight_seconds, matmul_seconds)
                + max(kv_seconds, 4 * c.num_layers * q * pairs / flops_rate))
    return weight_seconds + kv_seconds, roofline


def timeline(llm, steps, start, bandwidth, flops_rate, layer_flops_rate=None):
    """Decode-only steps bucketed by how many requests they ran (1-16, 17-32, ..., up to max_num_seqs),
    then one row for the steps that carry prompt tokens (their matmuls, not their bytes, set their
    speed): steps, seconds, byte-limit seconds, roofline-limit seconds, fractions, and each row's share
    of the time lost to the byte limit. Limits need a GPU (None elsewhere)."""
    buckets, previous = {}, start
    for step in steps:
        upper = 16
        while upper < step[1]:
            upper *= 2
        row = buckets.setdefault(upper if step[3] == step[1] else math.inf, [0, 0.0, 0.0, 0.0])
        row[0], row[1] = row[0] + 1, row[1] + step[0] - previous
        if bandwidth:
            byte_seconds, roofline_seconds = step_limits(llm, step, bandwidth, flops_rate, layer_flops_rate)
            row[2], row[3] = row[2] + byte_seconds, row[3] + roofline_seconds
        previous = step[0]
    lost = sum(seconds - limit for _, seconds, limit, _ in buckets.values()) if bandwidth else 0
    table = []
    for upper in sorted(buckets):
        count, seconds, limit, roofline = buckets[upper]
        table.append(dict(
            requests="with prefill" if upper == math.inf else f"{1 if upper == 16 else upper // 2 + 1}-{upper}",
            steps=count, seconds=round(seconds, 3),
            ms_per_step=round(1e3 * seconds / count, 2),
            limit_seconds=round(limit, 3) if bandwidth else None,
            fraction=round(limit / seconds, 3) if bandwidth else None,
            roofline_seconds=round(roofline, 3) if bandwidth else None,
            roofline_fraction=round(roofline / seconds, 3) if bandwidth else None,
            share_of_lost_time=round((seconds - limit) / lost, 3) if bandwidth and lost > 0 else None))
    return table


def _weight_bytes(llm):
    model = llm.runner.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:  # the embedding is only gathered (a few rows), not streamed
        weights -= model.embed_tokens.numel() * model.embed_tokens.element_size()
    return weights


def bytes_read(llm, stats_before, stats_after):
    """Weights once per step plus each scheduled request's K/V context: the run's minimum traffic."""
    config = llm.runner.model.config
    weights = _weight_bytes(llm)
    per_token = kv_cache.kv_cache_bytes_per_block(config.num_layers, 1, config.num_kv_heads, config.head_dim,
                                                  llm.runner.kv_cache_dtype)
    steps = stats_after.steps - stats_before.steps
    context = stats_after.context_tokens_read - stats_before.context_tokens_read
    return steps * weights + context * per_token, steps


# ----------------------------------------------------------------------------------------------
# --kernel: the paged-attention kernel alone. Qwen3-0.6B head layout (16 query heads, 8 KV heads,
# head_dim 128), bf16, block size 16, blocks in random order; triton.testing.do_bench medians of
# CUDA-graph replays with L2 flushed; bytes the kernel must move (K/V read + Q read + O write)
# against the copy bandwidth measured in the same run, and torch SDPA on the same data gathered
# contiguously. --sweep also times the alternative launch configurations the table was picked from.
# ----------------------------------------------------------------------------------------------

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16
DTYPE = torch.bfloat16
# (batch, context) -> the issue's target, as a fraction of copy bandwidth or a time in us.
DECODE_TARGETS = {(256, 512): "85%", (256, 1024): "90%", (256, 2048): "90%", (128, 8192): "91%",
                  (1, 8192): "<40us", (8, 8192): "65%", (32, 8192): "75%"}
DECODE_SHAPES = [(b, c) for b in (1, 8, 32, 128, 256) for c in (512, 1024, 2048, 8192)]
# name -> (query_lens, seq_lens): a fresh prompt, chunks after cached prefixes, chunk + decodes.
PREFILL_SHAPES = {
    "prompt 1x4096": ([4096], [4096]),
    "chunks 4x1024 @3k prefix": ([1024] * 4, [4096] * 4),
    "chunk 1024@1k + 128 decodes@1k": ([1024] + [1] * 128, [2048] + [1024] * 128),
}


def _median_us(fn):
    """GPU time of fn: replays of a CUDA graph of it (as the engine runs decode steps), so Python
    launch overhead, which the engine hides the same way, does not count; L2 flushed before each."""
    fn()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median") * 1e3


def host_us(fn, calls=200):
    """Python/launch overhead of one eager call (GPU work is small, so the host is the bottleneck)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def make_batch(query_lens, seq_lens, seed=0, cache_dtype=DTYPE):
    """Random q, paged caches with every request's blocks scattered over the pool, and metadata."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    pool = torch.randperm(sum(blocks), device="cuda", generator=gen).tolist()
    tables = [pool[start:start + n] for start, n in zip(itertools.accumulate([0, *blocks]), blocks)]
    cache_shape = (sum(blocks), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, device="cuda", dtype=DTYPE, generator=gen).to(cache_dtype)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=DTYPE, generator=gen).to(cache_dtype)
    q = torch.randn(sum(query_lens), NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return q, k_cache, v_cache, AttentionMetadata.from_lengths(query_lens, seq_lens, tables, BLOCK_SIZE, "cuda")


def bytes_needed(query_lens, seq_lens, cache_dtype=DTYPE):
    kv = sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * 2
    qo = sum(query_lens) * NUM_Q_HEADS * HEAD_DIM * 2
    return kv * cache_dtype.itemsize + qo * DTYPE.itemsize


def causal_flops(query_lens, seq_lens):
    keys_seen = sum(n * s - n * (n - 1) // 2 for n, s in zip(query_lens, seq_lens))
    return 4 * keys_seen * NUM_Q_HEADS * HEAD_DIM


def sdpa_us(query_lens, seq_lens, q, k_cache, v_cache, meta):
    """torch SDPA on the same data gathered contiguously, requests of equal shape batched.

    Returns (us, how): native GQA (enable_gqa) where the backend takes it, else K/V heads repeated
    before the timing (that backend then reads K/V twice)."""
    from torch.nn.attention.bias import causal_lower_right
    groups, start = {}, 0
    for i, (n, s) in enumerate(zip(query_lens, seq_lens)):
        groups.setdefault((n, s), []).append((i, start))
        start += n
    calls = []
    for (n, s), members in groups.items():
        rows = torch.cat([torch.arange(st, st + n) for _, st in members]).cuda()
        qb = q[rows].view(len(members), n, NUM_Q_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        tables = meta.block_table[[i for i, _ in members], : math.ceil(s / BLOCK_SIZE)].long()
        kb, vb = (c[tables].flatten(1, 2)[:, :s].transpose(1, 2).contiguous() for c in (k_cache, v_cache))
        mask = None if n == 1 else (causal_lower_right(n, s) if n != s else "causal")
        calls.append((qb, kb, vb, mask))

    def run(batches, **gqa):
        for qb, kb, vb, mask in batches:
            causal = {"is_causal": True} if mask == "causal" else {"attn_mask": mask}
            torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, **causal, **gqa)
    try:
        return _median_us(lambda: run(calls, enable_gqa=True)), "gqa"
    except Exception:
        repeat = NUM_Q_HEADS // NUM_KV_HEADS
        repeated = [(qb, kb.repeat_interleave(repeat, 1), vb.repeat_interleave(repeat, 1), mask)
                    for qb, kb, vb, mask in calls]
        return _median_us(lambda: run(repeated)), "repeat"


@functools.cache
def _unit_scales(device):  # made once: not a fill kernel inside every timed call
    return torch.ones(2, device=device)


def _attend(q, k_cache, v_cache, meta, config):
    kv_scale = _unit_scales(q.device) if k_cache.dtype == FP8 else None
    return paged_attention(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5, kv_scale, config=config)


def _time_config(q, k_cache, v_cache, meta, config):
    try:
        return _median_us(lambda: _attend(q, k_cache, v_cache, meta, config))
    except Exception as error:  # e.g. out of shared memory for a large tile: report and go on
        print(f"    {config}: failed ({type(error).__name__})")
        return float("inf")


def _percent(moved, us, copy_bw):
    return 100 * moved / (us * 1e-6) / copy_bw


def decode_sweep(copy_bw):
    for batch, context in [(256, 512), (256, 1024), (128, 8192)]:
        q, kc, vc, meta = make_batch([1] * batch, [context] * batch)
        moved = bytes_needed([1] * batch, [context] * batch)
        for block_n, warps, stages in [(64, 4, 2), (64, 4, 3), (64, 2, 2), (64, 2, 3), (128, 4, 2)]:
            t = _time_config(q, kc, vc, meta, LaunchConfig(16, block_n, 1, warps, stages))
            print(f"  sweep decode {batch}x{context} n={block_n} w={warps} s={stages} splits=1: "
                  f"{t:8.1f} us {_percent(moved, t, copy_bw):5.1f}%")
        del q, kc, vc, meta
    for batch, context in [(1, 8192), (8, 8192), (32, 8192), (1, 512), (8, 1024), (32, 512), (32, 2048)]:
        q, kc, vc, meta = make_batch([1] * batch, [context] * batch)
        moved = bytes_needed([1] * batch, [context] * batch)
        for block_n in (32, 64):
            for splits in (1, 2, 4, 8, 16, 32, 64, 128):
                if context // block_n < splits or (block_n == 32 and batch > 1):
                    continue
                t = _time_config(q, kc, vc, meta, LaunchConfig(16, block_n, splits, 4, 3))
                print(f"  sweep decode {batch}x{context} n={block_n} w=4 s=3 splits={splits}: "
                      f"{t:8.1f} us {_percent(moved, t, copy_bw):5.1f}%")
        del q, kc, vc, meta


def prefill_sweep():
    configs = [(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
               (64, 128, 4, 2)]
    for name, (query_lens, seq_lens) in PREFILL_SHAPES.items():
        q, kc, vc, meta = make_batch(query_lens, seq_lens)
        for block_m, block_n, warps, stages in configs:
            t = _time_config(q, kc, vc, meta, LaunchConfig(block_m, block_n, 1, warps, stages))
            print(f"  sweep prefill {name} m={block_m} n={block_n} w={warps} s={stages}: {t:8.1f} us "
                  f"{causal_flops(query_lens, seq_lens) / t / 1e6:6.1f} TFLOP/s")


def kernel_benchmark(args):
    """The decode shapes, then prefill and mixed batches; with --kv-cache-dtype fp8 an fp8 cache (bytes
    counted at 1 per element; no SDPA beside it)."""
    cache_dtype = DTYPE if args.kv_cache_dtype == "auto" else FP8
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    if args.sweep:
        decode_sweep(copy_bw)
        prefill_sweep()
    print(f"{'decode batch x context':>22} {'splits':>6} {'us':>8} {'MB':>8} {'TB/s':>5} {'%copy':>6} "
          f"{'target':>7} {'host us':>7} {'SDPA us':>8} {'SDPA %':>6}")
    for batch, context in DECODE_SHAPES:
        query_lens, seq_lens = [1] * batch, [context] * batch
        q, kc, vc, meta = make_batch(query_lens, seq_lens, cache_dtype=cache_dtype)
        config = choose_launch_config(q, kc, meta)
        t = _time_config(q, kc, vc, meta, config)
        host = host_us(lambda: _attend(q, kc, vc, meta, config))
        ts, how = sdpa_us(query_lens, seq_lens, q, kc, vc, meta) if kc.dtype == DTYPE else (math.inf, "")
        moved = bytes_needed(query_lens, seq_lens, cache_dtype)
        print(f"{batch:>11} x {context:<8} {config.num_splits:>6} {t:8.1f} {moved / 1e6:8.1f} "
              f"{moved / t / 1e6:5.2f} {_percent(moved, t, copy_bw):5.1f}% "
              f"{DECODE_TARGETS.get((batch, context), ''):>7} {host:7.1f} {ts:8.1f} "
              f"{_percent(moved, ts, copy_bw):5.1f}%"
              f" {how}")
        del q, kc, vc, meta
    print(f"{'prefill / mixed':>32} {'block_m':>7} {'us':>8} {'TFLOP/s':>8} {'host us':>7} {'SDPA us':>8} {'ratio':>6}")
    for name, (query_lens, seq_lens) in PREFILL_SHAPES.items():
        q, kc, vc, meta = make_batch(query_lens, seq_lens, cache_dtype=cache_dtype)
        config = choose_launch_config(q, kc, meta)
        t = _time_config(q, kc, vc, meta, config)
        host = host_us(lambda: _attend(q, kc, vc, meta, config), calls=50)
        ts, how = sdpa_us(query_lens, seq_lens, q, kc, vc, meta) if kc.dtype == DTYPE else (math.inf, "")
        print(f"{name:>32} {config.block_m:>7} {t:8.1f} {causal_flops(query_lens, seq_lens) / t / 1e6:8.1f} "
              f"{host:7.1f} {ts:8.1f} {t / ts:6.2f} {how}")


# argparse types: a bad value is reported at parse time as "argument --flag: ...", before any setup.
def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value <= 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def positive_number(text):
    value = float(text)
    if not 0 < value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def main():
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face checkpoint directory (default: random weights of --arch)")
    p.add_argument("--arch", default="qwen3-0.6b" if on_gpu else "tiny", choices=list(model.SHAPES))
    p.add_argument("--workload", default="default", choices=WORKLOADS,
                   help="offline: default, shared-prefix, long-prompt; online (served, with latencies): chat, "
                        "chat-multiturn, mixed, short")
    p.add_argument("--request-rate", type=positive_number, metavar="R",
                   help="requests arrive as a Poisson process of R per second (online); without it, online "
                        "workloads arrive all at once")
    p.add_argument("--compare", action="store_true", help="rerun with the workload's feature off: prefix caching "
                   "(chat, others), chunked prefill (mixed: a budget as large as the longest prompt)")
    p.add_argument("--through-server", action="store_true", help="online workloads: the same requests streamed "
                   "over HTTP to server.py's OpenAI-compatible API (on 127.0.0.1), from another process")
    p.add_argument("--num-seqs", type=positive_int, default=256 if on_gpu else 16)
    p.add_argument("--max-input-len", type=positive_int, default=1024 if on_gpu else 128)
    p.add_argument("--max-output-len", type=positive_int, default=1024 if on_gpu else 128)
    p.add_argument("--max-num-seqs", type=positive_int, default=256)
    p.add_argument("--max-num-batched-tokens", type=positive_int,
                   help="default 8,192; mixed: half of --max-input-len (at most 8,192), so its documents are chunked")
    p.add_argument("--block-size", type=positive_int, default=16)
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.9, help="in (0, 1]")
    p.add_argument("--no-async", action="store_true", help="schedule step N+1 only after step N's tokens")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="fp8: K/V stored in e4m3, half the bytes (with --compare: against auto)")
    p.add_argument("--calculate-kv-scales", action="store_true", help="fp8 scales from the first batch")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                   help="shard the model over N GPUs (N processes); the byte limits are then one GPU's share")
    p.add_argument("--budget-counts-attention", action="store_true",
                   help="a token at context L counts 1 + L/P of the budget (P: attention FLOPs = linear FLOPs)")
    p.add_argument("--quantization", choices=["fp8"], help="fp8: linear weights in e4m3 with a scale per output "
                   "channel, activations per token (W8A8); an fp8 checkpoint (--model) is detected without it")
    p.add_argument("--logprobs", type=int, metavar="K", help="ask every request for its top-K logprobs")
    p.add_argument("--speculative-ngram", type=positive_int, metavar="K", help="speculative decoding: up to K "
                   "n-gram drafts a step (prompt lookup of 4 down to 2 tokens)")
    p.add_argument("--speculative-disable-by-batch-size", type=positive_int, metavar="N",
                   help="with --speculative-ngram: no drafts while more than N requests run (default: the engine's)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="online workloads: draw inter-token latency over time (with "
                   "--compare, both runs; needs matplotlib)")
    p.add_argument("--timeline", action="store_true",
                   help="print the steps bucketed by requests per step against their limits (always in the JSON)")
    p.add_argument("--latency", action="store_true", help="batch-1 decode: one request with a --max-input-len "
                   "prompt, ms per step over LATENCY_STEPS steps against the step's byte limit")
    p.add_argument("--kernel", action="store_true", help="benchmark the paged-attention kernel alone (GPU)")
    p.add_argument("--sweep", action="store_true", help="with --kernel: also time other launch configurations")
    args = p.parse_args()
    check_args(p, args, on_gpu)
    if args.kernel:
        return kernel_benchmark(args)
    if not on_gpu:
        print(f"No GPU: running the {args.arch!r} shape on a small version of the workload "
              f"({args.num_seqs} requests, prompts <= {args.max_input_len}, outputs <= {args.max_output_len}).")

    result = decode_latency(args, on_gpu) if args.latency else run(args, on_gpu)
    if args.compare:  # the same workload with the feature it shows off switched off, in this process
        result["compare"] = run(args, on_gpu, compare=True)
    if args.plot:
        runs = [result] + ([result["compare"]] if args.compare else [])
        plot_latency(args.plot, [(describe(r), r.pop("itl_points")) for r in runs], args)
    show(result, args.timeline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def check_args(p, args, on_gpu):
    """Every flag that can fail is checked here, before any run, as a usage error naming it (not a traceback
    after minutes of benchmark). Also fits the lengths to the model's context and picks the default budget."""
    if args.kernel and not on_gpu:
        p.error("argument --kernel: needs a GPU")
    if args.latency and (args.compare or args.plot or args.max_output_len < 2):
        p.error("argument --latency: times decode steps of one request: it needs --max-output-len of at least 2, "
                "and takes no --compare or --plot")
    if args.plot and args.workload not in ONLINE_WORKLOADS and args.request_rate is None:
        p.error("argument --plot: draws inter-token latency: it needs an online workload (chat, mixed, ...)")
    if args.through_server and (args.latency or args.workload == "chat-multiturn"
                                or args.workload not in ONLINE_WORKLOADS and args.request_rate is None):
        p.error("argument --through-server: replays an online workload's requests (chat, mixed, short) over HTTP; "
                "chat-multiturn's next turns are built from the answers, which this replay does not do")
    if args.through_server and importlib.util.find_spec("uvicorn") is None:
        p.error("argument --through-server: needs fastapi and uvicorn: pip install -r requirements.txt")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("argument --plot: needs matplotlib: pip install matplotlib (it is in requirements-dev.txt)")
    if args.speculative_disable_by_batch_size and not args.speculative_ngram:
        p.error("argument --speculative-disable-by-batch-size: needs --speculative-ngram")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and (os.path.isdir(path) or not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)):
            p.error(f"argument {flag}: cannot write {path} (its directory is missing or not writable)")
    try:
        config = model.read_config(args.model) if args.model else model.SHAPES[args.arch]
    except (OSError, ValueError) as error:
        p.error(f"argument --model: {error}")
    if args.logprobs is not None and not 0 <= args.logprobs <= config.vocab_size:
        p.error(f"argument --logprobs: expected 0 to the vocabulary size, {config.vocab_size}, got {args.logprobs}")
    fit_to_context(p, args, config.max_position_embeddings)
    if args.max_num_batched_tokens is None:  # mixed: a chunk of its longer documents, so that they are chunked
        args.max_num_batched_tokens = max(1, min(8192, args.max_input_len // 2)) if args.workload == "mixed" else 8192
    if args.compare and engine_settings(args) == engine_settings(args, compare=True):
        p.error("argument --compare: the rerun would repeat the first run (" + ("mixed: one-shot prefill is a budget "
                "of --max-input-len; chunked needs a smaller --max-num-batched-tokens" if args.workload == "mixed"
                else "prefix caching is off already: drop --no-prefix-caching") + ")")


def fit_to_context(p, args, context):
    """Clip --max-input-len and --max-output-len to the largest cap (the longer one is cut first) at which the
    workload's longest request fits the model's context, saying so; a usage error if no cap does."""
    lengths = args.max_input_len, args.max_output_len

    def needed(cap):
        return longest_sequence(args.workload, *(min(n, cap) for n in lengths))
    cap = bisect.bisect_left(range(1, max(lengths) + 1), True, key=lambda c: needed(c) > context)  # caps 1..cap fit
    if cap < (least := 2 if args.latency else 1):
        p.error(f"argument --workload: {args.workload} needs at least {needed(least)} tokens of context, more than "
                f"{args.model or args.arch}'s {context} (max_position_embeddings)")
    if cap < max(lengths):
        args.max_input_len, args.max_output_len = (min(n, cap) for n in lengths)
        print(f"{args.model or args.arch} holds {context:,} tokens (max_position_embeddings): --max-input-len "
              f"{lengths[0]:,} -> {args.max_input_len:,}, --max-output-len {lengths[1]:,} -> {args.max_output_len:,}")


def engine_settings(args, compare=False):
    """The LLM's arguments for a run; with compare, --compare's rerun: the workload's feature off (the fp8 cache;
    mixed: chunked prefill, by a budget as large as the longest prompt; else prefix caching)."""
    settings = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=longest_sequence(args.workload, args.max_input_len, args.max_output_len),
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    enable_prefix_caching=not args.no_prefix_caching, async_scheduling=not args.no_async,
                    enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
                    calculate_kv_scales=args.calculate_kv_scales, tensor_parallel_size=args.tensor_parallel_size,
                    budget_counts_attention=args.budget_counts_attention, quantization=args.quantization)
    if args.speculative_ngram:
        settings["speculative_config"] = dict(method="ngram", num_speculative_tokens=args.speculative_ngram,
                                              prompt_lookup_max=4, prompt_lookup_min=2)
        if args.speculative_disable_by_batch_size:
            settings["speculative_config"]["disable_by_batch_size"] = args.speculative_disable_by_batch_size
    if compare and args.kv_cache_dtype != "auto":
        settings["kv_cache_dtype"] = "auto"
    elif compare and args.workload == "mixed":
        settings["max_num_batched_tokens"] = max(args.max_num_batched_tokens, args.max_input_len)
    elif compare:
        settings["enable_prefix_caching"] = False
    return settings


def run(args, on_gpu, compare=False):
    """One timed run of the workload on a new engine (the previous one's memory is freed first)."""
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    started = time.perf_counter()
    settings = engine_settings(args, compare)
    llm = LLM(args.model or args.arch, **settings)
    setup_seconds = time.perf_counter() - started
    vocab_limit = min(10000, llm.runner.model.config.vocab_size - 1)  # nano-vllm's ids, within a tiny vocabulary
    prompts, params = make_workload(args.workload, args.num_seqs, args.max_input_len, args.max_output_len, vocab_limit)
    if args.logprobs is not None:
        params = [dataclasses.replace(p, logprobs=args.logprobs) for p in params]
    bandwidth = copy_bandwidth() if on_gpu else None
    flops_rate = matmul_rate() if on_gpu else None
    fp8_rate = matmul_rate(fp8=True) if on_gpu and args.quantization == "fp8" else None
    # Warm-up on another draw of the same workload with short outputs: its chunked prefills have the
    # shapes of the timed run's, so the Triton kernels they need are compiled (and cached on disk)
    # before the clock starts; it shares no prefix with the timed prompts.
    warm_prompts, _ = make_workload(args.workload, args.num_seqs, args.max_input_len, args.max_output_len,
                                    vocab_limit, seed=1)
    llm.generate(warm_prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    kv = llm.scheduler.kv_cache_manager
    hits_before, queries_before = kv.num_hit_tokens, kv.num_query_tokens
    stats_before = llm.stats.__class__(**vars(llm.stats))
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    online = args.workload in ONLINE_WORKLOADS or args.request_rate is not None
    steps_seen, gpu_spans = record_steps(llm), record_gpu_spans(llm)
    start = time.perf_counter()
    if online:
        arrivals = arrival_times(len(prompts), args.request_rate)
        if args.through_server:
            start, token_times, seconds = serve_through_server(llm, prompts, params, arrivals)
        else:
            token_times, seconds = serve(llm, prompts, params, arrivals, follow_ups(args.workload, len(prompts)))
        output_tokens = sum(map(len, token_times))
    else:
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        failed = [o for o in outputs if o.error]
        if failed:
            raise SystemExit(f"{len(failed)} requests failed, e.g. {failed[0].error}")
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)

    prompt_tokens = sum(len(prompt) for prompt in prompts)
    queries = kv.num_query_tokens - queries_before
    result = dict(
        arch=args.model or args.arch, workload=args.workload, through_server=args.through_server,
        logprobs=args.logprobs, num_seqs=args.num_seqs,
        device=str(llm.runner.device), gpu=torch.cuda.get_device_name() if on_gpu else None,
        async_scheduling=settings["async_scheduling"], cuda_graphs=bool(llm.runner.graphs),
        prefix_caching=settings["enable_prefix_caching"], kv_cache_dtype=settings["kv_cache_dtype"],
        quantization=settings["quantization"],
        max_num_batched_tokens=settings["max_num_batched_tokens"], tensor_parallel_size=args.tensor_parallel_size,
        budget_counts_attention=args.budget_counts_attention,
        output_tokens=output_tokens, prompt_tokens=prompt_tokens, seconds=round(seconds, 3),
        output_tokens_per_s=round(output_tokens / seconds, 1),
        total_tokens_per_s=round((output_tokens + prompt_tokens) / seconds, 1),
        requests_per_s=round(len(prompts) / seconds, 1),
        kv_capacity_tokens=kv.num_blocks * llm.config.block_size,
        prefix_cache_hit_rate=round((kv.num_hit_tokens - hits_before) / queries, 4) if queries else 0.0,
        setup_seconds=round(setup_seconds, 1))
    needed, steps = bytes_read(llm, stats_before, llm.stats)
    result.update(steps=steps, graph_steps=llm.stats.graph_steps - stats_before.graph_steps)
    if args.speculative_ngram:
        result.update(speculative_metrics(stats_before, llm.stats))
    if online:
        classes = [("document" if len(p) > QUESTION_LEN[1] else "chat") if args.workload == "mixed"
                   else f"turn {i % TURNS + 1}" if args.workload == "chat-multiturn" else args.workload
                   for i, p in enumerate(prompts)]
        result.update(request_rate=args.request_rate, latency=latency_table(token_times, arrivals, classes))
        if args.plot:  # (popped before printing) each short request's inter-token gaps, at the time of the later token
            result["itl_points"] = [(b, 1e3 * (b - a)) for i, c in enumerate(classes) if c != "document"
                                    for a, b in zip(token_times[i], token_times[i][1:])]
    result["timeline"] = timeline(llm, steps_seen, start, bandwidth, flops_rate, fp8_rate)
    if on_gpu:
        torch.cuda.synchronize()
        busy_ms = sum(begin.elapsed_time(end) for begin, end in gpu_spans)
        result["gpu_busy_fraction"] = round(busy_ms / 1e3 / seconds, 4)
        limit_seconds = needed / bandwidth
        roofline_seconds = sum(row["roofline_seconds"] for row in result["timeline"])  # already per step
        result.update(peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), matmul_tflop_s=round(flops_rate / 1e12, 1),
                      fp8_matmul_tflop_s=fp8_rate and round(fp8_rate / 1e12, 1),
                      bytes_needed_gb=round(needed / 1e9, 1),
                      limit_output_tokens_per_s=round(output_tokens / limit_seconds, 1),
                      fraction_of_bandwidth_limit=round(limit_seconds / seconds, 4),
                      fraction_of_roofline_limit=round(roofline_seconds / seconds, 4))
    return result


def speculative_metrics(before, after) -> dict:
    """Drafts proposed and accepted between two EngineStats, the acceptance rate, and the mean accepted length:
    the tokens a request emits in a step with drafts (its accepted drafts and one more)."""
    proposed, accepted, steps = (getattr(after, name) - getattr(before, name)
                                 for name in ("draft_tokens", "accepted_draft_tokens", "draft_request_steps"))
    return dict(drafts_proposed=proposed, drafts_accepted=accepted,
                draft_acceptance_rate=round(accepted / proposed, 4) if proposed else None,
                mean_accepted_length=round(1 + accepted / steps, 3) if steps else None)


LATENCY_STEPS = 256


def decode_latency(args, on_gpu):
    """One request decoding alone, as an interactive user sees it: the median time between two of its
    steps (with async overlap, one step's wall time), against that step's byte limit (every weight once
    plus its K/V context). The prompt is --max-input-len random ids; a warm-up request compiles first."""
    settings = engine_settings(args)
    llm = LLM(args.model or args.arch, **settings)
    rng, vocab_limit = random.Random(0), min(10000, llm.runner.model.config.vocab_size - 1)
    prompt, warm = ([rng.randrange(vocab_limit) for _ in range(args.max_input_len)] for _ in range(2))
    params = SamplingParams(temperature=0.6, max_tokens=min(LATENCY_STEPS, args.max_output_len), ignore_eos=True)
    llm.generate([warm], params, use_tqdm=False)
    steps = record_steps(llm)
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    if output.error:
        raise SystemExit(f"the request failed: {output.error}")
    decode = [(b[0] - a[0], b[2]) for a, b in zip(steps, steps[1:]) if b[3] == 1]  # (seconds, context)
    seconds = sorted(t for t, _ in decode)[len(decode) // 2]
    result = dict(arch=args.model or args.arch, gpu=torch.cuda.get_device_name() if on_gpu else None,
                  async_scheduling=settings["async_scheduling"], quantization=settings["quantization"],
                  kv_cache_dtype=settings["kv_cache_dtype"], context=f"{decode[0][1]}-{decode[-1][1]}",
                  steps=len(decode), ms_per_step=round(seconds * 1e3, 3))
    if on_gpu:  # the byte limit of the middle step (one new token; no matmul rate: its roofline is not reported)
        bandwidth, context = copy_bandwidth(), decode[len(decode) // 2][1]
        limit = step_limits(llm, (0, 1, context, 1, 1, context), bandwidth, flops_rate=math.inf)[0]
        result.update(copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), limit_ms_per_step=round(limit * 1e3, 3),
                      fraction_of_bandwidth_limit=round(limit / seconds, 3))
    return result


def describe(result):
    """A run's label on the plot: the setting that --compare changes."""
    return (f"max_num_batched_tokens={result['max_num_batched_tokens']:,}"
            f"{' counting attention' if result.get('budget_counts_attention') else ''}, prefix caching "
            f"{'on' if result['prefix_caching'] else 'off'}, KV {result['kv_cache_dtype']}, "
            f"{result['output_tokens_per_s']:,.0f} tok/s")


def plot_latency(path, runs, args):
    """Inter-token latency (ms, log scale) against time: one series of points per run."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for (label, points), color in zip(runs, ("tab:blue", "tab:red")):
        ax.scatter([t for t, _ in points], [ms for _, ms in points], s=3, alpha=0.4, color=color, label=label)
    ax.set(yscale="log", xlabel="seconds since the first request", ylabel="inter-token latency, ms",
           title=f"{args.workload} workload, {args.arch}, {args.num_seqs} requests"
                 + (f" at {args.request_rate:g}/s" if args.request_rate else "") + " (requests under 256 tokens)")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show(result, timeline_too, indent=""):
    width = max(map(len, result))
    for key, value in result.items():
        if key == "compare":
            print(f"{indent}compare (the feature off):")
            show(value, timeline_too, indent + "  ")
        elif key == "latency":
            for name, row in value.items():
                print(f"{indent}{'latency ' + name:<{width}}  {row}")
        elif key == "timeline":
            if timeline_too:
                columns = list(value[0])
                print(f"{indent}" + " | ".join(columns))
                for row in value:
                    print(f"{indent}" + " | ".join("-" if row[c] is None else f"{row[c]}" for c in columns))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            print(f"{indent}{key:<{width}}  {value:,}")
        else:
            print(f"{indent}{key:<{width}}  {value}")

if __name__ == "__main__":
    main()

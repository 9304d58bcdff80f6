"""The sampler: a step's logits in, one token per row out, on the device with no host sync.

vLLM's order: penalties and min_tokens' bans adjust the logits, min_p and top-k cut the tail, top-p
what is left of it, then a draw from softmax(logits / T) (the argmax for greedy rows). The draw is
the Gumbel-max trick in one Triton kernel, beside its plain-torch reference; each row's noise comes
from (its request's seed, the token's index), so a seeded request draws the same tokens in any batch.
Logprobs are vLLM's raw ones: log_softmax of the model's logits, before any adjustment.

Speculative decoding: a row per draft position; accept_drafts keeps the drafts their rows' draws agree with.

Owns: the sampling tensors of a step and every operation on logits. Never touches: requests, the
scheduler (the runner hands it plain lists of rows and token ids).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


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


def logits_adjustment(rows: list[tuple], num_rows: int, vocab_size: int, previous_sampled, device) -> LogitsAdjustment:
    """A step's penalties and bans as tensors, from one tuple per adjusted row: (row, its output token
    ids, its prompt token ids, (repetition, frequency, presence) or None, the row of its newest token in
    `previous_sampled` (sampled by the step in flight, still on the device) or None, the ids it may not draw)."""
    factors = [[1.0, 0.0, 0.0] for _ in range(num_rows)]
    counted, prompt, pending, banned = ([], []), ([], []), ([], []), ([], [])
    for row, output_ids, prompt_ids, penalties, pending_row, banned_ids in rows:
        pairs_of_row = [(banned, banned_ids)]
        if penalties is not None:
            factors[row] = penalties
            pending_rows = () if pending_row is None else (pending_row,)
            pairs_of_row += [(counted, output_ids), (prompt, prompt_ids), (pending, pending_rows)]
        for (rows_of, ids_of), ids in pairs_of_row:
            rows_of.extend([row] * len(ids))
            ids_of.extend(ids)
    pairs = lambda pair: (to_device(pair[0], device), to_device(pair[1], device))  # noqa: E731
    counts = torch.zeros(num_rows, vocab_size, device=device)
    counts.index_put_(pairs(counted), torch.ones(len(counted[0]), device=device), accumulate=True)
    if pending[0]:
        tokens = previous_sampled.index_select(0, to_device(pending[1], device))
        counts.index_put_((to_device(pending[0], device), tokens), torch.ones(len(pending[0]), device=device),
                          accumulate=True)
    prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
    prompt_mask[pairs(prompt)] = True
    return LogitsAdjustment(counts, prompt_mask, *to_device(factors, device, torch.float32).T, *pairs(banned))


def adjust_logits(logits, adjust: LogitsAdjustment):
    """vLLM's order: repetition penalty (HF: over prompt and output, a positive logit divided by it,
    a negative one multiplied), then frequency and presence (OpenAI: output tokens only), then bans."""
    seen = adjust.prompt_mask | (adjust.output_counts > 0)
    penalty = torch.where(seen, adjust.repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - adjust.frequency[:, None] * adjust.output_counts
    logits = logits - adjust.presence[:, None] * (adjust.output_counts > 0)
    return logits.index_put((adjust.banned_rows, adjust.banned_tokens), logits.new_tensor(float("-inf")))


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
    pass over the vocabulary with no softmax, cumsum or search."""
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


def accept_drafts(tokens: list[int], row: int, drafts: list[int]) -> list[int]:
    """The rejection sampler for drafts of probability 1 (n-gram): tokens[row + i] is the draw at draft i's
    position; keep the drafts equal to their draws, then one draw more. Greedy: accept while the draft is the
    argmax. Sampled, the standard rule: the Gumbel draw is draft d with probability p(d) (accept), and a draw
    that is not d follows p with d removed, renormalised (the residual). Each row has the noise of its output
    index, so a seeded request gets the same tokens with speculation on or off."""
    accepted = next((i for i, draft in enumerate(drafts) if tokens[row + i] != draft), len(drafts))
    return tokens[row:row + accepted + 1]


def seed_for(seed: int, index: int) -> int:
    """A 31-bit seed derived from (seed, index): the k-th draw of a request, the k-th of n completions."""
    return hash((seed, index)) & 0x7FFFFFFF


def to_device(values: list, device, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


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

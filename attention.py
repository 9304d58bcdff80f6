"""Paged attention: the Triton kernels and their plain-torch references.

Owns: turning the fused q/k/v projection into attention inputs (Qwen3's per-head q/k RMSNorm,
RoPE, writing the new K/V into the paged cache: one fused kernel per layer), and attention for a
flat batch of query tokens from many requests (prefill chunks and decodes mixed, causal, GQA),
read through block tables. Never touches: which blocks a request owns, the RoPE angles.

KV cache layout (per layer): k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads,
head_dim]; token `offset` of block `b` lives at slot b * block_size + offset. A key is head_dim
contiguous elements (256 bytes in bf16 at head_dim 128): full memory transactions even though a
request's pages are scattered over the pool.

How the attention kernel works (FlashAttention-2 + flash-decoding, over pages):
- One program owns a tile of query rows of one request and one KV head: (query token, query head)
  pairs for all query heads sharing that KV head (GQA packing), so each K/V tile is loaded once.
  KV heads vary fastest over the grid: one query tile's programs run together and read whole cache
  blocks, not 256-byte strips spread over the run (H100: 4k prefill 17% faster, mixed decode 1.5-3%).
- It walks the request's keys in tiles of BLOCK_N, finding each key's page in the block table,
  with an online softmax in fp32: running max m, running sum l and an unnormalised output acc,
  rescaled by exp(m_old - m_new) whenever the max grows. No score matrix is stored.
- Causality: tiles whose keys every row may see run unmasked, then the few diagonal tiles masked.
- Decode has little work per program, and batch x kv_heads programs may not fill 132 SMs: then
  the keys are split over several programs (flash-decoding), each writing its normalised partial
  output and log-sum-exp, and a small reduce kernel merges them.
"""
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def token_slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start..end-1 of a request whose logical block i is block_ids[i]."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass
class AttentionMetadata:
    """Where each request's query tokens are in the flat batch and where its context lives."""
    slot_mapping: torch.Tensor     # [num_tokens] int64: cache slot of each new token; -1 = padding, not written
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: request i owns query rows [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor         # [num_seqs] int32: context length including this step's tokens
    block_table: torch.Tensor      # [num_seqs, max_blocks_per_seq] int32: physical block of each logical block
    max_query_len: int             # host-side; 1 means a decode-only batch
    max_seq_len: int               # host-side upper bound of seq_lens (eager launches only)

    @classmethod
    def from_lengths(cls, query_lens, seq_lens, block_tables, block_size, device=None, width=None):
        """The metadata of a batch whose request i computes the last query_lens[i] of its seq_lens[i]
        positions and keeps its logical block j in block_tables[i][j] (tables padded with 0 to
        `width` columns). The engine fills the same fields into its one input buffer instead."""
        slots = [slot for table, n, seq_len in zip(block_tables, query_lens, seq_lens)
                 for slot in token_slots(table, seq_len - n, seq_len, block_size)]
        width = width or max(map(len, block_tables))
        int32 = dict(dtype=torch.int32, device=device)
        return cls(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                   query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], **int32),
                   seq_lens=torch.tensor(seq_lens, **int32),
                   block_table=torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], **int32),
                   max_query_len=max(query_lens), max_seq_len=max(seq_lens))


FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value: quantizing saturates there


def to_cache(x, scale, cache_dtype):
    """x in the cache's dtype: for fp8, x / scale, saturated (scale: this layer's per-tensor K or V scale)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8) if cache_dtype == FP8 else x.to(cache_dtype)


def apply_rope(x, cos, sin):
    """Rotate x [T, heads, head_dim] by its positions' angles (cos, sin: [T, 1, head_dim]).
    Llama/Qwen checkpoints pair dimension i with i + head_dim/2 (HF's rotate_half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((-x2, x1), dim=-1), sin)


def rotated_qkv(qkv, positions, cos_table, sin_table, q_norm, k_norm, eps, num_kv_heads, head_dim):
    """qkv [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim] -> q, k, v [num_tokens, heads,
    head_dim]: q and k heads RMS-normalised by q_norm/k_norm (Qwen3; None elsewhere) and rotated by
    their positions' angles (tables [max_positions, head_dim])."""
    heads = qkv.view(qkv.shape[0], -1, head_dim)
    q, k, v = heads.split([heads.shape[1] - 2 * num_kv_heads, num_kv_heads, num_kv_heads], dim=1)
    if q_norm is not None:
        q, k = F.rms_norm(q, (head_dim,), q_norm, eps), F.rms_norm(k, (head_dim,), k_norm, eps)
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def rope_and_write_kv_reference(qkv, positions, cos_table, sin_table, q_norm, k_norm, eps,
                                k_cache, v_cache, slot_mapping, kv_scale=None):
    """rotated_qkv, then k, v written at slot_mapping (-1: not; fp8: k / kv_scale[0], v / kv_scale[1]); returns q.
    Written before attention runs: this step's keys must be visible to its own queries."""
    q, k, v = rotated_qkv(qkv, positions, cos_table, sin_table, q_norm, k_norm, eps, *k_cache.shape[2:])
    keep = slot_mapping >= 0
    scales = kv_scale if k_cache.dtype == FP8 else (1.0, 1.0)
    for x, cache, scale in ((k, k_cache, scales[0]), (v, v_cache, scales[1])):
        cache.view(-1, *cache.shape[2:])[slot_mapping[keep]] = to_cache(x[keep], scale, cache.dtype)
    return q


def paged_attention_reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, kv_scale=None):
    """The readable definition of paged attention, one request at a time: request i's n query rows are the last n
    positions of its seq_lens[i]; position p sees keys 0..p; seq_len 0 yields zeros. fp8: see to_cache."""
    k_scale, v_scale = kv_scale if k_cache.dtype == FP8 else (1.0, 1.0)
    out = torch.zeros_like(q)
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]  # group: query heads per KV head (GQA)
    starts = meta.query_start_loc.tolist()
    for i, (start, end, seq_len) in enumerate(zip(starts, starts[1:], meta.seq_lens.tolist())):
        if start == end or seq_len == 0:
            continue
        blocks = meta.block_table[i, : (seq_len + block_size - 1) // block_size].long()
        k = (k_cache[blocks].flatten(0, 1)[:seq_len].float() * k_scale).repeat_interleave(group, dim=1)
        v = (v_cache[blocks].flatten(0, 1)[:seq_len].float() * v_scale).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        positions = torch.arange(seq_len, device=q.device)  # the query rows are the last end - start of them
        scores.masked_fill_(positions[None, :] > positions[seq_len - (end - start):, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


# ---- q/k norm + RoPE + KV write: one program per token, all its heads. Done as separate torch ops this
# is ~8 kernels per layer, each a few microseconds of launch for a few KB of data in a decode step.

@triton.jit
def _load_norm_rotate(ptrs, mask, norm_ptr, eps, cos1, sin1, cos2, sin2,
                      HAS_NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    # ptrs [heads, HEAD_DIM / 2]: each head's first half. x1, x2: the two halves that rotate_half pairs up.
    half = tl.arange(0, HEAD_DIM // 2)[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
        x1 = x1 * rstd * tl.load(norm_ptr + half).to(tl.float32)
        x2 = x2 * rstd * tl.load(norm_ptr + HEAD_DIM // 2 + half).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rope_and_write_kv_kernel(qkv_ptr, positions_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, eps,
                              q_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, kv_scale_ptr,
                              stride_qkv_token, stride_table, stride_cache_block, stride_cache_offset,
                              stride_cache_head, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                              Q_HEADS_POW2: tl.constexpr, KV_HEADS_POW2: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_NORM: tl.constexpr,
                              FP8_KV: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, HEAD_DIM // 2)[None, :]
    table = tl.load(positions_ptr + token) * stride_table + half
    cos1 = tl.load(cos_ptr + table).to(tl.float32)
    sin1 = tl.load(sin_ptr + table).to(tl.float32)
    cos2 = tl.load(cos_ptr + table + HEAD_DIM // 2).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + HEAD_DIM // 2).to(tl.float32)
    row = qkv_ptr + token * stride_qkv_token

    q_heads = tl.arange(0, Q_HEADS_POW2)[:, None]
    q_mask = q_heads < NUM_Q_HEADS
    q_offsets = q_heads * HEAD_DIM + half
    q1, q2 = _load_norm_rotate(row + q_offsets, q_mask, q_norm_ptr, eps, cos1, sin1, cos2, sin2, HAS_NORM, HEAD_DIM)
    q_out = q_out_ptr + token * (NUM_Q_HEADS * HEAD_DIM) + q_offsets
    tl.store(q_out, q1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_out + HEAD_DIM // 2, q2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    kv_heads = tl.arange(0, KV_HEADS_POW2)[:, None]
    k_offsets = (NUM_Q_HEADS + kv_heads) * HEAD_DIM + half
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    kv_mask = kv_heads < tl.where(slot >= 0, NUM_KV_HEADS, 0)  # slot -1: a padding token, nothing stored
    k1, k2 = _load_norm_rotate(row + k_offsets, kv_mask, k_norm_ptr, eps, cos1, sin1, cos2, sin2, HAS_NORM, HEAD_DIM)
    cache = ((slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_offset
             + kv_heads * stride_cache_head)
    dims = tl.arange(0, HEAD_DIM)[None, :]
    v = tl.load(row + (NUM_Q_HEADS + NUM_KV_HEADS + kv_heads) * HEAD_DIM + dims, mask=kv_mask)
    if FP8_KV:  # per-tensor scales, saturated: what to_cache does
        k_scale, v_scale = tl.load(kv_scale_ptr), tl.load(kv_scale_ptr + 1)
        k1 = tl.clamp(k1 / k_scale, -448.0, 448.0)  # FP8_MAX
        k2 = tl.clamp(k2 / k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
    tl.store(k_cache_ptr + cache + half, k1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(k_cache_ptr + cache + HEAD_DIM // 2 + half, k2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(v_cache_ptr + cache + dims, v.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def rope_and_write_kv(qkv, positions, cos_table, sin_table, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping,
                      kv_scale=None):
    """Triton version of rope_and_write_kv_reference (same arguments and result); one launch, fp32
    math inside, CUDA-graph safe. qkv's rows may be strided; each row's elements must be contiguous."""
    _check_caches(k_cache, v_cache)
    num_tokens, width = qkv.shape if qkv.dim() == 2 else (-1, -1)
    num_kv_heads, head_dim = k_cache.shape[2:]
    num_q_heads = width // head_dim - 2 * num_kv_heads
    if (width % head_dim or num_q_heads < 1 or num_q_heads % num_kv_heads or qkv.stride(-1) != 1
            or not _fits_cache(qkv, k_cache, kv_scale)):
        raise ValueError(f"qkv must be [num_tokens, (num_q_heads + 2 * {num_kv_heads}) * {head_dim}] in the cache's "
                         f"dtype {k_cache.dtype} (fp8: any float dtype, with kv_scale), num_q_heads a multiple of "
                         f"{num_kv_heads}, rows contiguous; got {tuple(qkv.shape)} {qkv.dtype}")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions and slot_mapping must have shape [{num_tokens}], "
                         f"got {tuple(positions.shape)} and {tuple(slot_mapping.shape)}")
    if (cos_table.dim() != 2 or cos_table.shape[1] != head_dim or sin_table.shape != cos_table.shape
            or sin_table.stride() != cos_table.stride() or cos_table.stride(1) != 1):
        raise ValueError(f"cos_table and sin_table must be [max_positions, {head_dim}] with equal strides, contiguous "
                         f"rows; got {tuple(cos_table.shape)} and {tuple(sin_table.shape)}")
    has_norm = q_norm is not None
    if (k_norm is not None) != has_norm or (has_norm and (q_norm.shape, k_norm.shape) != ((head_dim,),) * 2):
        raise ValueError(f"q_norm and k_norm must both be None or both [{head_dim}]")
    q = torch.empty(num_tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    _rope_and_write_kv_kernel[(num_tokens,)](
        qkv, positions, cos_table, sin_table, q_norm if has_norm else qkv,  # unused norm pointers: any tensor
        k_norm if has_norm else qkv, eps, q, k_cache, v_cache, slot_mapping, qkv if kv_scale is None else kv_scale,
        qkv.stride(0), cos_table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, Q_HEADS_POW2=triton.next_power_of_2(num_q_heads),
        KV_HEADS_POW2=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        HAS_NORM=has_norm, FP8_KV=k_cache.dtype == FP8)
    return q


# ---- Paged attention kernel. ----------------------------------------------------------------------------------------

@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    # Request i's query tiles are numbered from qsl[i] // BLOCK_Q + i on (this gives every request
    # ceil(n_i / BLOCK_Q) tiles or one more, and the grid an upper bound that needs only shapes:
    # num_tokens // BLOCK_Q + num_seqs). Binary search for the last request starting <= tile.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_key_tiles(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table_row_ptr, head_offset,
                      tile_lo, tile_hi, kv_len, row_pos, qk_scale, stride_cache_block, stride_cache_offset,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, PAGES_AHEAD: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    # Each key finds its page in the block table; with BLOCK_SIZE >= 16 neighbouring keys share an
    # entry (a cached broadcast), and any block order or block size works the same way. PAGES_AHEAD
    # (prefill) loads a tile's pages one tile early, so its K/V loads wait on no load of their own:
    # 4k prompt 1.33x -> 1.21x SDPA (H100, H200). Decode, whose pipeline already hides it, lost 1-3%.
    next_pos = tile_lo * BLOCK_N + tl.arange(0, BLOCK_N)
    next_page = tl.load(block_table_row_ptr + next_pos // BLOCK_SIZE, mask=next_pos < kv_len, other=0)
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        in_context = key_pos < kv_len
        if PAGES_AHEAD:
            page, next_pos = next_page, key_pos + BLOCK_N
            next_page = tl.load(block_table_row_ptr + next_pos // BLOCK_SIZE, mask=next_pos < kv_len, other=0)
        elif MASKED:
            page = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE, mask=in_context, other=0)
        else:
            page = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE)
        # int64: a layer's cache can hold more than 2**31 elements.
        row = page.to(tl.int64) * stride_cache_block + (key_pos % BLOCK_SIZE) * stride_cache_offset + head_offset
        offsets = row[:, None] + dims[None, :]
        if MASKED:
            k = tl.load(k_cache_ptr + offsets, mask=in_context[:, None], other=0.0)
            v = tl.load(v_cache_ptr + offsets, mask=in_context[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + offsets)
            v = tl.load(v_cache_ptr + offsets)
        k, v = k.to(q.dtype), v.to(q.dtype)  # fp8 caches: dequantized in registers (the scales apply outside)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # unscaled: qk_scale joins the exp2's FMA
        if MASKED:
            scores = tl.where(key_pos[None, :] <= row_pos[:, None], scores, float("-inf"))
        # Online softmax in log2 units. m_i starts at -1e30, not -inf, so a row that sees no key in this
        # tile gets exp2(-inf) = 0 terms and alpha = 1 instead of NaN from (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
        query_start_loc_ptr, seq_lens_ptr, block_table_ptr, kv_scale_ptr, qk_scale, num_seqs,
        stride_q_token, stride_q_head, stride_out_token, stride_out_head,
        stride_cache_block, stride_cache_offset, stride_cache_head, stride_block_table,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, ONE_TILE_PER_SEQ: tl.constexpr,
        SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_KV: tl.constexpr, NUM_KV_HEADS: tl.constexpr):
    # Tiles in reversed order: with causal prefill the last tiles of a request see the most keys;
    # starting them first leaves the short ones for the end of the grid (a guard against a long
    # tail; on a 4k prompt it measured the same as forward order).
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    tile = tl.num_programs(0) // NUM_KV_HEADS - 1 - tl.program_id(0) // NUM_KV_HEADS
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    if ONE_TILE_PER_SEQ:  # every request has at most BLOCK_Q query rows (e.g. all decodes)
        seq = tile
        q_lo = 0
    else:
        seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
        q_lo = (tile - tl.load(query_start_loc_ptr + seq) // BLOCK_Q - seq) * BLOCK_Q
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_lo >= q_len:  # a spare tile of the shape-only grid
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # Row r of the tile is query token q_lo + r // GROUP, query head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    q_local = q_lo + rows // GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_local < q_len)
    q_head = kv_head * GROUP + rows % GROUP
    token = q_start + q_local
    row_pos = seq_len - q_len + q_local  # the query's position in its context
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token[:, None] * stride_q_token + q_head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None], other=0.0)

    # Keys 0..kv_len-1 are seen by some row; keys of the first num_full_tiles are seen by all rows.
    q_hi = tl.minimum(q_lo + BLOCK_Q, q_len)
    kv_len = seq_len - q_len + q_hi
    num_full_tiles = (seq_len - q_len + q_lo + 1) // BLOCK_N
    num_tiles = tl.cdiv(kv_len, BLOCK_N)
    # This program's share of the key tiles (all of them unless split); computed from seq_len on
    # the device, so a launch sized from shapes adapts to any context lengths.
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    if FP8_KV:  # the cache holds K / k_scale and V / v_scale: fold k_scale into the scores' scale
        qk_scale = qk_scale * tl.load(kv_scale_ptr)
        if q.dtype == tl.bfloat16:  # e4m3 -> fp16 is one instruction a pair, -> bf16 goes through fp32:
            q = q.to(tl.float16)    # 1.1-1.3x faster decode (H100), and fp16 keeps more of p and q
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    block_table_row_ptr = block_table_ptr + seq.to(tl.int64) * stride_block_table
    head_offset = kv_head * stride_cache_head
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table_row_ptr, head_offset,
        tile_lo, tl.minimum(tile_hi, num_full_tiles), kv_len, row_pos, qk_scale,
        stride_cache_block, stride_cache_offset, HEAD_DIM, BLOCK_N, BLOCK_SIZE, False, DOT_PRECISION,
        not ONE_TILE_PER_SEQ)
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block_table_row_ptr, head_offset,
        tl.maximum(tile_lo, num_full_tiles), tile_hi, kv_len, row_pos, qk_scale,
        stride_cache_block, stride_cache_offset, HEAD_DIM, BLOCK_N, BLOCK_SIZE, True, DOT_PRECISION,
        not ONE_TILE_PER_SEQ)

    # l_i == 0: the row saw no key (seq_len 0 padding, or an empty split): output 0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if FP8_KV:  # ... and v_scale into the output
        out = out * tl.load(kv_scale_ptr + 1)
    if SPLIT:
        # Partials are [num_tokens, num_q_heads, num_splits, HEAD_DIM] fp32, plus one log2-sum-exp
        # per row, so the reduce reads each row's splits contiguously.
        partial = (token * (GROUP * NUM_KV_HEADS) + q_head) * num_splits + split
        tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], out, mask=row_valid[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(partial_lse_ptr + partial, lse, mask=row_valid)
    else:
        tl.store(out_ptr + token[:, None] * stride_out_token + q_head[:, None] * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, num_splits,
                         stride_out_token, stride_out_head,
                         HEAD_DIM: tl.constexpr, SPLITS_POW2: tl.constexpr):
    # out = sum_s exp2(lse_s) * out_s / sum_s exp2(lse_s), taken relative to the max lse to stay finite.
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_POW2)
    dims = tl.arange(0, HEAD_DIM)
    partial = (token * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(partial_lse_ptr + partial, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)  # all splits empty: weights 0, output 0
    weight = tl.exp2(lse - lse_max)
    parts = tl.load(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :],
                    mask=(splits < num_splits)[:, None], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_out_token + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty))


# ---- Launch configuration, picked from a small table measured on an H200 (`bench.py --kernel
# --sweep`; figures in BENCHMARKS.md). Not triton.autotune: autotuning would benchmark inside the
# engine's first step and inside CUDA-graph capture, where timing runs are not allowed.

@dataclass(frozen=True)
class LaunchConfig:
    block_m: int     # query rows per program: (query tokens) x (query heads of one KV head)
    block_n: int     # keys per inner-loop tile
    num_splits: int  # programs per (query tile, KV head) along the keys: flash-decoding
    num_warps: int
    num_stages: int  # software-pipelining depth: K/V tiles in flight while one is computed


# Tiles are sized in bytes of one K tile (block_n x head_dim), so other head dims and dtypes keep the
# measured footprint (fp8 caches: 128-key tiles, 1.17-1.5x faster than 64 on the H100's decode shapes;
# more stages or warps were slower). Decode streams K/V with little arithmetic per byte: a 16 KB tile
# (block_n 64 at bf16/128), 4 warps, 2 stages ran at 89-104% of copy bandwidth on the large
# decode batches; 32-key tiles were 13-19% slower, 8 warps up to 15%, 3-4 stages within 3%.
# (largest block_m, tile_bytes, num_warps, num_stages)
DECODE = (16, 16384, 4, 2)
# Batches with prefills, keyed on the mean query length num_tokens / num_seqs and on max_seq_len:
# long chunks that see long contexts reuse each K/V tile for 128 rows (128 x 128 tiles, 8 warps,
# 3 stages: H100, 4 chunks of 1k after 3k 302 us, against 308 with the short config). Short
# contexts (fresh prompts up to 1k, 8 x 1,000 134 us against 148) and decodes plus chunks waste
# less on causal and padded rows with block_m 64 (a 1k chunk + 128 decodes: 232 us against 263).
PREFILL_LONG = (128, 32768, 8, 3)
PREFILL_SHORT = (64, 16384, 4, 3)
LONG_MEAN_QUERY_LEN, LONG_MIN_CONTEXT = 128, 2048
# A query row wider than this many bytes (head_dim 256, or fp32 at 128) halves block_m: the q
# tile and the fp32 accumulator live in registers (the bf16/128 long config already uses 255).
WIDE_ROW_BYTES = 256
# Split the keys until about this many programs run (132 SMs, a few programs each; measured
# best: 1 x 8k -> 32-64 splits, 8 x 8k -> 8, 32 x 8k -> 2, 128 x 8k -> 1) ...
SPLIT_TARGET_PROGRAMS = 512
# ... but keep at least this many key tiles per split, so the partials stay cheap to merge.
MIN_TILES_PER_SPLIT = 2


def choose_launch_config(q, k_cache, meta: AttentionMetadata) -> LaunchConfig:
    """Tile sizes and split count from shapes (and max_seq_len if prefills): a decode-only batch's
    launch is replayed in a CUDA graph with other seq_lens and block tables."""
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_seqs = meta.block_table.shape[0]
    if meta.max_query_len == 1:  # decode only
        max_block_m, tile_bytes, num_warps, num_stages = DECODE
        max_context = meta.block_table.shape[1] * block_size
    else:
        long_queries = num_tokens >= LONG_MEAN_QUERY_LEN * num_seqs and meta.max_seq_len >= LONG_MIN_CONTEXT
        max_block_m, tile_bytes, num_warps, num_stages = PREFILL_LONG if long_queries else PREFILL_SHORT
        if head_dim * q.element_size() > WIDE_ROW_BYTES:
            max_block_m //= 2
        max_context = meta.max_seq_len
    block_m = max(16, min(max_block_m, triton.next_power_of_2(meta.max_query_len * group)),
                  triton.next_power_of_2(group))  # tl.dot needs >= 16 rows; a tile holds whole GQA groups
    block_n = min(128, max(16, tile_bytes // (head_dim * k_cache.element_size())))
    block_q = block_m // group
    num_tiles = num_seqs if meta.max_query_len <= block_q else num_tokens // block_q + num_seqs
    programs, num_splits = num_tiles * num_kv_heads, 1
    while (programs * num_splits < SPLIT_TARGET_PROGRAMS
           and triton.cdiv(max_context, block_n) >= 2 * num_splits * MIN_TILES_PER_SPLIT):
        num_splits *= 2
    return LaunchConfig(block_m, block_n, num_splits, num_warps, num_stages)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, kv_scale=None,
                    config: LaunchConfig | None = None):
    """Triton version of paged_attention_reference (same arguments and result); `config` overrides
    choose_launch_config (tests force splits; benchmarks sweep). Rows of q owned by no request (at or
    after query_start_loc[-1]) are left unwritten."""
    config = config or choose_launch_config(q, k_cache, meta)
    _check_caches(k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if not _fits_cache(q, k_cache, kv_scale) or head_dim != k_cache.shape[3] or num_q_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not fit caches {tuple(k_cache.shape)} {k_cache.dtype}: "
                         "same dtype (fp8 caches: a float dtype, and kv_scale) and head_dim, num_q_heads a multiple "
                         "of num_kv_heads")
    if q.stride(2) != 1 or not scale > 0:  # (the kernel's masked -inf scores times scale: NaN at 0)
        raise ValueError(f"q must be contiguous along head_dim and scale > 0; got stride {q.stride(2)}, scale {scale}")
    group = num_q_heads // num_kv_heads
    block_q = config.block_m // group
    if block_q < 1:
        raise ValueError(f"block_m {config.block_m} must be at least the GQA group {group}")
    num_seqs = meta.block_table.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    one_tile_per_seq = meta.max_query_len <= block_q
    num_tiles = num_seqs if one_tile_per_seq else num_tokens // block_q + num_seqs
    split = config.num_splits > 1
    partial_out = partial_lse = out  # unused by the kernel when SPLIT is False
    if split:  # allocation sized by shapes only, so CUDA graphs capture it
        partial_lse = torch.empty(num_tokens, num_q_heads, config.num_splits, dtype=torch.float32, device=q.device)
        partial_out = partial_lse.new_empty(num_tokens, num_q_heads, config.num_splits, head_dim)
    _paged_attention_kernel[(num_tiles * num_kv_heads, config.num_splits)](
        q, k_cache, v_cache, out, partial_out, partial_lse,
        meta.query_start_loc, meta.seq_lens, meta.block_table, q if kv_scale is None else kv_scale,
        scale * 1.4426950408889634, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n,
        BLOCK_SIZE=block_size, ONE_TILE_PER_SEQ=one_tile_per_seq, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8_KV=k_cache.dtype == FP8,
        NUM_KV_HEADS=num_kv_heads, num_warps=config.num_warps, num_stages=config.num_stages)
    if split:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            partial_out, partial_lse, out, config.num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_POW2=triton.next_power_of_2(config.num_splits))
    return out


def _check_caches(k_cache, v_cache):
    """Shape and layout checks that need no device sync."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim] with equal "
                         f"shapes and strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    for name, size, smallest in (("block_size", k_cache.shape[1], 1), ("head_dim", k_cache.shape[3], 16)):
        if size & (size - 1) or not smallest <= size <= 256:
            raise ValueError(f"{name} must be a power of two in {smallest}..256, got {size}")
    if k_cache.stride(3) != 1:
        raise ValueError("k_cache/v_cache must be contiguous along head_dim (stride 1)")
    if k_cache.dtype not in (*FLOATS, FP8):
        raise ValueError(f"cache dtype must be float32, float16, bfloat16 or float8_e4m3fn, got {k_cache.dtype}")


def _fits_cache(x, cache, kv_scale) -> bool:  # x (qkv or q): the cache's dtype, or a float dtype and fp8 scales
    return x.dtype == cache.dtype or (cache.dtype == FP8 and x.dtype in FLOATS and kv_scale is not None)

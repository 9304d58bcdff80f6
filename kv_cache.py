"""The KV block pool, the prefix cache, and the KV tensor's size and allocation (vLLM V1 semantics).

The idea (PagedAttention): the KV cache is cut into blocks of `block_size` token slots. A request's
block table maps its logical block i (positions i*block_size ... (i+1)*block_size - 1) to any
physical block, so memory is handed out a block at a time and never fragments. A full block whose
tokens are known is also entered in the prefix cache under a hash of its tokens and of its parent
block's hash (a chain, so the hash stands for the whole prefix up to the block's end): a later
request with the same prefix reuses the block instead of recomputing it. A freed block keeps its
contents and its hash until it is evicted, least recently freed first, so finished requests go on
serving hits.

A block enters the cache when it is allocated for the step that computes it (a request admitted in
the same step can share it), stamped with that step; if a step fails, `forget_cached_blocks` takes
the blocks of unfinished steps out again, so no request ever reads K/V that was never written.

Hash collisions are harmless twice over: the chain hash is SHA-256 (256 bits, no collision has ever
been found), and a hit is only taken if the cached block's tokens and parent hash are equal to the
request's, so even a forced collision (the tests monkeypatch `hash_block`) is a miss, not a reuse.

Owns: blocks and their ref counts, the free queue, the hash -> block map, the block tables'
bookkeeping, hit counters; sizing and allocating the KV tensor.
Never touches: the tensor's contents, scheduling decisions, model code.
"""
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
import hashlib

import torch

ROOT_HASH = b""  # the "parent hash" of a request's first block


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: the blocks that hold a tokens, b to a block."""
    return -(-a // b)


def hash_block(parent_hash: bytes, token_ids) -> bytes:
    """SHA-256 of the parent block's hash and this block's token ids: a hash of the whole prefix.
    (Extra keys such as a LoRA id or a cache salt would be hashed in here; nothing needs them yet.)"""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass(eq=False, slots=True)
class KVBlock:
    """One physical block. Free iff ref_count == 0; then it sits in the free queue exactly once."""
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is in the prefix cache
    parent_hash: bytes = ROOT_HASH   # with token_ids: what a hit is checked against
    token_ids: tuple = ()
    step: int = 0                    # the scheduler step that computes it (when cached)


@dataclass(eq=False)
class BlockTable:
    """One request's blocks in position order (logical block i -> block_ids[i])."""
    block_ids: list[int] = field(default_factory=list)
    # Hashes of its full blocks of known tokens, computed once each; they depend only on the
    # tokens, so they survive free() (a preempted request looks its prefix up again for free).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache


class KVCacheManager:
    """The block pool, the prefix cache and the block tables behind three calls, each O(blocks it touches):
    lookup (prefix hits for an empty table), allocate (grow a table, all or nothing) and free."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.enable_prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order, first out first: a linked hash map (C), so a prefix hit takes a
        # free block out of the middle in O(1), where a deque would need a scan.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((block.block_id, block) for block in self.blocks)
        self.cached_blocks: dict[bytes, KVBlock] = {}  # block hash -> the block holding that prefix
        self.num_query_tokens = 0  # tokens looked up at admissions
        self.num_hit_tokens = 0    # of which found in the prefix cache
        self.step = 0              # the step being scheduled: stamped on the blocks it registers

    def lookup(self, table: BlockTable, token_ids: list[int]) -> list[KVBlock]:
        """The longest chain of cached blocks equal to the start of token_ids. Capped so that at
        least one token is left to compute: a fully cached prompt must still produce logits.
        Touches nothing; pass the result to allocate()."""
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        max_hit_blocks = (len(token_ids) - 1) // size
        self._hash_blocks(table, token_ids, max_hit_blocks)
        hits = []
        for i, block_hash in enumerate(table.block_hashes[:max_hit_blocks]):
            block = self.cached_blocks.get(block_hash)
            if (block is None or block.parent_hash != (hits[-1].block_hash if hits else ROOT_HASH)
                    or block.token_ids != tuple(token_ids[i * size:(i + 1) * size])):
                break
            hits.append(block)
        return hits

    def allocate(self, table: BlockTable, token_ids: list[int], num_tokens: int, hits: list[KVBlock] = ()) -> bool:
        """Grow `table` to cover slots 0..num_tokens-1, taking `hits` (from lookup(), only into an
        empty table) first. All or nothing: False, with no change at all, if the blocks are not
        there. token_ids are the request's known tokens; full blocks of them within num_tokens are
        entered in the prefix cache now, stamped with self.step: the caller computes them in that
        step, before any later step reads them (or calls forget_cached_blocks if it fails)."""
        size = self.block_size
        if hits or cdiv(num_tokens, size) > len(table.block_ids):  # most decode steps need no block
            num_new_blocks = cdiv(num_tokens, size) - len(table.block_ids) - len(hits)
            # A hit on a free block takes it out of the free queue, so it costs a free block too.
            if max(num_new_blocks, 0) + sum(block.ref_count == 0 for block in hits) > len(self.free_queue):
                return False
            assert not hits or not table.block_ids, "prefix hits go only into an empty block table"
            if not table.block_ids:  # an admission: count it for the hit rate
                self.num_query_tokens += len(token_ids)
                self.num_hit_tokens += len(hits) * size
            for block in hits:
                if block.ref_count == 0:
                    del self.free_queue[block.block_id]
                block.ref_count += 1
                table.block_ids.append(block.block_id)
            table.num_registered_blocks += len(hits)
            for _ in range(cdiv(num_tokens, size) - len(table.block_ids)):
                table.block_ids.append(self._take_free_block().block_id)
        num_full_blocks = min(num_tokens, len(token_ids)) // size
        if self.enable_prefix_caching and num_full_blocks > table.num_registered_blocks:
            self._hash_blocks(table, token_ids, num_full_blocks)
            for i in range(table.num_registered_blocks, num_full_blocks):
                block_hash = table.block_hashes[i]
                if block_hash in self.cached_blocks:
                    # A twin (same prefix, computed by a request that missed it) is already cached;
                    # this copy stays private, so block tables stay append-only.
                    continue
                block = self.blocks[table.block_ids[i]]
                block.block_hash = block_hash
                block.parent_hash = table.block_hashes[i - 1] if i else ROOT_HASH
                block.token_ids = tuple(token_ids[i * size:(i + 1) * size])
                block.step = self.step
                self.cached_blocks[block_hash] = block
            table.num_registered_blocks = num_full_blocks
        return True

    def free(self, table: BlockTable) -> None:
        """Release every block of the table. Its last block goes to the free queue first, so it is
        evicted first: a prefix is worth more than its continuation."""
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = block
        table.block_ids, table.num_registered_blocks = [], 0

    def forget_cached_blocks(self, after_step: int = -1) -> None:
        """Take the blocks registered by steps after `after_step` (all by default) out of the cache:
        after a failed step or new weights; O(cached blocks), never in a normal step."""
        for block_hash, block in list(self.cached_blocks.items()):
            if block.step > after_step:
                del self.cached_blocks[block_hash]
                block.block_hash = None

    def reclaim(self) -> None:
        """When no table holds a block (after a failed step's recovery), every block is free: an
        interrupt inside allocate() or free() may have left one counted, out of the queue, or named
        by a hash the cache does not map to it. O(blocks), never in a normal step."""
        for block in self.blocks:
            block.ref_count = 0
            self.free_queue.setdefault(block.block_id, block)
            if block.block_hash is not None and self.cached_blocks.get(block.block_hash) is not block:
                block.block_hash = None

    def _take_free_block(self) -> KVBlock:
        block = self.free_queue.popitem(last=False)[1]
        if block.block_hash is not None:  # evict it from the prefix cache: its slots get rewritten
            del self.cached_blocks[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block

    def _hash_blocks(self, table: BlockTable, token_ids: list[int], num_full_blocks: int) -> None:
        size, hashes = self.block_size, table.block_hashes
        for i in range(len(hashes), num_full_blocks):
            hashes.append(hash_block(hashes[i - 1] if i else ROOT_HASH, token_ids[i * size:(i + 1) * size]))


# ---- the KV tensor: its size and its allocation ----

def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                             dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The one KV tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], zeroed
    (a stale NaN in an unused slot would still poison a masked-out attention product)."""
    return torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def num_blocks_from_memory(bytes_per_block: int, gpu_memory_utilization: float, peak_bytes: int, device) -> int:
    """How many KV blocks fit in gpu_memory_utilization x the GPU's total memory, given torch's peak
    allocation in the engine's profiling step (weights + activations, without the scratch cache).
    At that peak the process also holds what torch's allocator does not (CUDA context, workspaces;
    other processes on the GPU count the same): (total - free) - memory_reserved. Cached but
    unallocated torch memory is not counted: the KV tensor can reuse it."""
    free, total = torch.cuda.mem_get_info(device)
    non_torch = (total - free) - torch.cuda.memory_reserved(device)
    budget = total * gpu_memory_utilization - (peak_bytes + non_torch)
    return max(int(budget // bytes_per_block), 0)


def check_kv_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """ValueError, naming the knobs to turn, unless one request of max_model_len tokens fits."""
    needed = cdiv(max_model_len, block_size)
    if num_blocks < needed:
        raise ValueError(f"the KV cache has {num_blocks} blocks of {block_size} tokens ({num_blocks * block_size} "
                         f"tokens), but one request of max_model_len={max_model_len} tokens needs {needed} blocks: "
                         f"raise gpu_memory_utilization (or num_blocks), or lower max_model_len, or lower "
                         f"max_num_batched_tokens (the profiling pass's activation peak grows with it)")

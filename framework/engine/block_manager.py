"""Paged KV cache bookkeeping: which physical blocks hold which sequence's tokens.

Blocks are reference counted so that, with prefix caching, sequences sharing a prompt prefix
share its full blocks. A full block is identified by a hash chained over every token up to it;
a freed block keeps its hash until it is reused, so a later request can still hit it.

A model with sliding-window layers (Gemma-3) has two KV groups, each a pool of its own: the full
layers' (`seq.block_table`, every block of the context) and the window layers'
(`seq.window_block_table`, indexed by the same logical block number). A window layer's query at
position p reads keys p - W < n <= p, so once a sequence has computed c tokens, its logical
blocks before (c - W + 1) // block_size are out of every later window: they go back to the
window pool (their table entries become -1, which the kernels never read). The window group's
blocks grow with the window, the full group's with the context.

Why two pools rather than one: a block holds one layer group's K/V; giving every layer a slot
in every block is what made window layers hold the whole context. Preemption frees both tables
(recompute rebuilds both). Prefix caching publishes the same chained hashes in both pools; a
prefix hit of k blocks also needs the window blocks its last window reaches (blocks k - w..k-1),
so the hit is cut back to the longest prefix whose window blocks are still cached.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

from framework.engine.sequence import Sequence


class BlockPool:
    """One group's physical blocks: reference counts, the free list in eviction order (oldest
    first), and the prefix cache's hash <-> block maps (a free block stays findable until reused)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free: "OrderedDict[int, None]" = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_to_block: Dict[int, int] = {}
        self.block_hash: Dict[int, int] = {}

    def take(self, block: Optional[int] = None, cache_hit: bool = False) -> int:
        """A reference to `block` (a cache hit), or to the oldest free block (for new tokens)."""
        if block is None:
            block = next(iter(self.free))
        if self.ref_counts[block] == 0:
            del self.free[block]
            if not cache_hit:  # reused for new tokens: forget what it held
                old = self.block_hash.pop(block, None)
                if old is not None:
                    del self.hash_to_block[old]
        self.ref_counts[block] += 1
        return block

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def publish(self, block: int, h: int) -> None:
        if block not in self.block_hash and h not in self.hash_to_block:
            self.block_hash[block] = h
            self.hash_to_block[h] = block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_window_blocks: int = 0, sliding_window: int = 0):
        """`sliding_window` > 0 with `num_window_blocks`: the window layers' own pool (see the
        module docstring); 0: every layer keeps every block in the one pool."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.full = BlockPool(num_blocks)
        self.window: Optional[BlockPool] = BlockPool(num_window_blocks) if sliding_window else None
        self.sliding_window = sliding_window

    # the full pool under its historical names (tests and the engine's stats read them)
    @property
    def ref_counts(self) -> List[int]:
        return self.full.ref_counts

    @property
    def hash_to_block(self) -> Dict[int, int]:
        return self.full.hash_to_block

    @property
    def num_free_blocks(self) -> int:
        return len(self.full.free)

    @property
    def num_free_window_blocks(self) -> int:
        return len(self.window.free) if self.window is not None else 0

    def _first_live_block(self, num_computed_tokens: int) -> int:
        """The first logical block a window can still reach once this many tokens are computed:
        the next query (position num_computed_tokens) sees keys from num_computed - W + 1 on."""
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def window_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New window blocks for this step, less those its first query's window has left behind."""
        if self.window is None:
            return 0
        table = seq.window_block_table
        stale = sum(1 for b in table[:self._first_live_block(seq.num_computed_tokens)] if b >= 0)
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(table)) - stale

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return (self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks
                and self.window_blocks_needed(seq, num_new_tokens) <= self.num_free_window_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block tables so they cover the tokens computed after this step; first give
        back the window blocks that no window reaches any more."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self.full.take())
        if self.window is None:
            return
        self._release_passed_window_blocks(seq)
        table = seq.window_block_table
        missing = len(seq.block_table) - len(table)
        if missing > self.num_free_window_blocks:  # the scheduler checks first; a direct caller may not
            raise RuntimeError(f"the sliding-window layers' KV pool has {self.num_free_window_blocks} free blocks; "
                               f"{num_new_tokens} new tokens of one step need {missing}")
        for _ in range(missing):
            table.append(self.window.take())

    def _release_passed_window_blocks(self, seq: Sequence) -> None:
        table = seq.window_block_table
        for i in range(min(len(table), self._first_live_block(seq.num_computed_tokens))):
            if table[i] >= 0:
                self.window.release(table[i])
                table[i] = -1

    def share_prefix(self, parent: Sequence, seq: Sequence, num_blocks: int) -> None:
        """`seq` (with no blocks yet) takes references to the parent's first num_blocks full
        blocks, and to the window blocks that the window after them reaches (the parent, whose
        prompt just reached them, still holds those)."""
        seq.block_table = [self.full.take(b, cache_hit=True) for b in parent.block_table[:num_blocks]]
        if self.window is not None:
            live = self._first_live_block(num_blocks * self.block_size)
            shared = parent.window_block_table[live:num_blocks]
            assert all(b >= 0 for b in shared), "the parent's window blocks were released before its samples took them"
            seq.window_block_table = [-1] * live + [self.window.take(b, cache_hit=True) for b in shared]

    def free_blocks(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the prefix goes back last: evicted last
            self.full.release(block)
        for block in reversed(seq.window_block_table):
            if block >= 0:
                self.window.release(block)
        seq.block_table, seq.window_block_table = [], []
        seq.num_computed_tokens = seq.num_registered_blocks = 0

    # --- prefix caching -------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> List[int]:
        """Chained hashes of the sequence's first num_blocks full blocks. A full block's tokens
        never change, so each is hashed once and kept on the sequence."""
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            start, end = i * self.block_size, (i + 1) * self.block_size
            tokens = tuple(seq.token_ids[start:end])
            hashes.append(hash((hashes[-1] if hashes else 0, tokens, seq.block_extra(start, end))))
        return hashes[:num_blocks]

    def reuse_cached_prefix(self, seq: Sequence) -> None:
        """On first schedule: adopt cached blocks of the longest matching full-block prefix.
        At least one token is always left to compute, so the step still yields logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        hashes = self._hashes(seq, (seq.num_tokens - 1) // self.block_size)
        hits = 0
        while hits < len(hashes) and hashes[hits] in self.full.hash_to_block:
            hits += 1
        if self.window is not None:  # the hit's last window must be cached in the window pool too
            while hits and not all(hashes[i] in self.window.hash_to_block
                                   for i in range(self._first_live_block(hits * self.block_size), hits)):
                hits -= 1
        seq.block_table = [self.full.take(self.full.hash_to_block[h], cache_hit=True) for h in hashes[:hits]]
        if self.window is not None:
            live = self._first_live_block(hits * self.block_size)
            seq.window_block_table = [-1] * live + [self.window.take(self.window.hash_to_block[h], cache_hit=True)
                                                    for h in hashes[live:hits]]
        seq.num_computed_tokens = hits * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the hashes of blocks that are now full (in both pools)."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        first_new = seq.num_registered_blocks
        for i, h in enumerate(self._hashes(seq, num_full)[first_new:], start=first_new):
            self.full.publish(seq.block_table[i], h)
            if self.window is not None and seq.window_block_table[i] >= 0:
                self.window.publish(seq.window_block_table[i], h)
        seq.num_registered_blocks = num_full


def window_blocks_per_request(block_size: int, sliding_window: int, max_model_len: int) -> int:
    """Window blocks one running request keeps at most, this step's new tokens aside: from the
    block its first query's window starts in to the block of its last key, plus rounding."""
    return min(-(-max_model_len // block_size), -(-(sliding_window - 1) // block_size) + 3)


def split_kv_budget(budget_bytes: int, spec, max_model_len: int, max_num_batched_tokens: int) -> tuple:
    """(full-group blocks, window-group blocks) for a KV budget; `spec` has block_size,
    sliding_window, bytes_per_block (full group) and window_bytes_per_block.

    The split holds the same number R of max_model_len requests in both pools: each needs
    ceil(max_model_len / block_size) full blocks and window_blocks_per_request window blocks, and
    the window pool keeps room for one step's new tokens besides (a prefill chunk's blocks are
    live until its window passes them). Shorter requests use relatively more window blocks; when
    the window pool runs out first, the scheduler preempts as it does for the full pool."""
    bs = spec.block_size
    full_per_request = -(-max_model_len // bs)
    window_per_request = window_blocks_per_request(bs, spec.sliding_window, max_model_len)
    chunk = min(full_per_request, -(-max_num_batched_tokens // bs))
    per_request = full_per_request * spec.bytes_per_block + window_per_request * spec.window_bytes_per_block
    requests = max(0.0, (budget_bytes - chunk * spec.window_bytes_per_block) / per_request)
    full = int(requests * full_per_request)
    window = int((budget_bytes - full * spec.bytes_per_block) // spec.window_bytes_per_block)
    return full, max(0, window)

"""Paged KV cache bookkeeping: which physical blocks hold which sequence's tokens.

Blocks are reference counted so that, with prefix caching, sequences sharing a prompt prefix
share its full blocks. A full block is identified by a hash chained over every token up to it;
a freed block keeps its hash until it is reused, so a later request can still hit it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

from framework.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks in eviction order (oldest first); cached ones stay findable until reused.
        self.free: "OrderedDict[int, None]" = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_to_block: Dict[int, int] = {}
        self.block_hash: Dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table so it covers the tokens computed after this step."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take(next(iter(self.free))))

    def free_blocks(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the prefix goes back last: evicted last
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_registered_blocks = 0

    def _take(self, block: int, cache_hit: bool = False) -> int:
        if self.ref_counts[block] == 0:
            del self.free[block]
            if not cache_hit:  # reused for new tokens: forget what it held
                old = self.block_hash.pop(block, None)
                if old is not None:
                    del self.hash_to_block[old]
        self.ref_counts[block] += 1
        return block

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
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for h in self._hashes(seq, max_blocks):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            seq.block_table.append(self._take(block, cache_hit=True))
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the hashes of blocks that are now full."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        first_new = seq.num_registered_blocks
        for i, h in enumerate(self._hashes(seq, num_full)[first_new:], start=first_new):
            block = seq.block_table[i]
            if block not in self.block_hash and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
        seq.num_registered_blocks = num_full

"""Continuous batching with chunked prefill and preemption by recompute.

Each step spends a token budget (max_num_batched_tokens): running sequences first (a decode
costs one token, an unfinished prefill continues with its next chunk), then waiting ones in
arrival order while seats (max_num_seqs) and KV blocks last. When blocks run out, the newest
running sequence is preempted: its blocks are freed and it will be recomputed from scratch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, List

from framework.engine.block_manager import BlockManager
from framework.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: List[Sequence]
    num_new_tokens: List[int]  # tokens each sequence computes this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.block_manager.allocate(seq, n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        # A step that had to preempt admits nobody new: the freed blocks go to the running.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.reuse_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.can_allocate(seq, n):
                if not self.running:  # nothing will ever free a block for it
                    raise RuntimeError(f"request {seq.request_id} needs more KV blocks than the cache has "
                                       f"({self.block_manager.num_blocks})")
                self.block_manager.free_blocks(seq)  # give back any prefix hits
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Also for a waiting sequence: with async scheduling, one preempted while its last
        token was still being computed may finish on that token."""
        (self.running if seq.status == Status.RUNNING else self.waiting).remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.block_manager.free_blocks(seq)

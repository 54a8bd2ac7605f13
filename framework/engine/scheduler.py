"""Continuous batching with chunked prefill and preemption by recompute.

Each step spends a token budget (max_num_batched_tokens): running sequences first (a decode
costs one token, an unfinished prefill continues with its next chunk), then waiting ones in
arrival order while seats (max_num_seqs) and KV blocks last. When blocks run out, the newest
running sequence is preempted: its blocks are freed and it will be recomputed from scratch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

from framework.engine.block_manager import BlockManager
from framework.engine.sequence import Sequence, Status
from framework.multimodal.encoder_cache import EncoderCache


@dataclass
class ScheduledBatch:
    seqs: List[Sequence]
    num_new_tokens: List[int]  # tokens each sequence computes this step
    # multimodal: items to encode this step (content hash, modality, processor outputs), and
    # encoder outputs to drop (evicted from the encoder cache)
    mm_encode: List[Tuple[str, str, Dict[str, Any]]] = field(default_factory=list)
    mm_evict: List[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 encoder_cache: Optional[EncoderCache] = None):
        self.block_manager = block_manager
        self.encoder_cache = encoder_cache  # multimodal models: which items' encoder outputs are held
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
            n = self._fit_runs(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            n = self._fit_encoder(seq, n, batch) if n else 0
            if n == 0:  # its next image run, or its encoder outputs, do not fit this step
                continue
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
            n = self._fit_runs(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            n = self._fit_encoder(seq, n, batch) if n else 0
            if n == 0 or not self.block_manager.can_allocate(seq, n):
                if n == 0:
                    self.block_manager.free_blocks(seq)
                    break
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

    @staticmethod
    def _fit_runs(seq: Sequence, n: int) -> int:
        """The chunk length `n`, or less so that it does not end inside a bidirectional run
        (Gemma-3's images: the run's first tokens must see its last ones, so it is computed in
        one chunk, as vLLM does). 0 when the chunk starts in or at a run that does not fit this
        step's budget (it waits; a run longer than max_num_batched_tokens is refused at admission)."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        for a, b in seq.bidirectional_runs:
            if a < end < b:
                return max(0, a - start)
        return n

    def _fit_encoder(self, seq: Sequence, n: int, batch: ScheduledBatch) -> int:
        """The chunk length `n` (or less) whose items' encoder outputs are held or fit the encoder
        cache this step; items not held yet join batch.mm_encode. A chunk may end inside an item
        (its embeddings are all computed at once, the chunk uses its part)."""
        if not seq.mm_items or self.encoder_cache is None:
            return n
        cache = self.encoder_cache
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        for placed in seq.mm_items:
            if placed.end <= start or placed.offset >= end:
                continue
            key = placed.item.content_hash
            if cache.acquire(key, seq.seq_id):
                continue
            if not cache.can_fit(placed.item.num_tokens):
                return placed.offset - start  # stop before this item; it is encoded in a later step
            for old in cache.add(key, placed.item.num_tokens, seq.seq_id):
                encoded_now = [e for e in batch.mm_encode if e[0] == old]
                if encoded_now:  # encoded earlier in this step for a request since preempted: skip it
                    batch.mm_encode.remove(encoded_now[0])
                else:
                    batch.mm_evict.append(old)
            if key in batch.mm_evict:  # evicted earlier in this step: the runner still holds it
                batch.mm_evict.remove(key)
            else:
                batch.mm_encode.append((key, placed.item.modality, placed.item.data))
        return n

    def release_encoder_inputs(self, seq: Sequence) -> None:
        """After a step: items whose whole placeholder run is computed are no longer needed by `seq`."""
        if self.encoder_cache is None:
            return
        for placed in seq.mm_items:
            if placed.end <= seq.num_computed_tokens:
                self.encoder_cache.release(seq.seq_id, placed.item.content_hash)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.encoder_cache is not None:
            self.encoder_cache.release(seq.seq_id)
        self.block_manager.free_blocks(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Also for a waiting sequence: with async scheduling, one preempted while its last
        token was still being computed may finish on that token."""
        (self.running if seq.status == Status.RUNNING else self.waiting).remove(seq)
        if self.encoder_cache is not None:
            self.encoder_cache.release(seq.seq_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.block_manager.free_blocks(seq)

"""The encoder cache: the vision tower's output per item, on the model's device, budgeted in
embedding tokens (one per placeholder token).

An item is encoded once, when the first prefill chunk that covers part of its placeholder run is
scheduled, and stays while any running request still needs it: chunked prefill may spread one
image over several steps, and two requests with the same image (same content hash) share one
entry. Entries no running request references are kept for later hits and evicted oldest first
when room is needed. The budget defaults to `max_num_batched_tokens`, raised to the largest item
(vLLM's rule), so one step's worth of new items always fits.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Hashable, Optional, Set

import torch


@dataclass
class _Entry:
    embeddings: torch.Tensor  # [num_tokens, hidden]
    users: Set[Hashable] = field(default_factory=set)

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]


@dataclass
class EncoderCacheStats:
    budget_tokens: int
    used_tokens: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


def encoder_budget_tokens(max_num_batched_tokens: int, largest_item_tokens: int) -> int:
    return max(max_num_batched_tokens, largest_item_tokens)


class EncoderCache:
    def __init__(self, budget_tokens: int):
        self.budget_tokens = budget_tokens
        self._entries: "OrderedDict[str, _Entry]" = OrderedDict()
        self.stats = EncoderCacheStats(budget_tokens)

    @property
    def used_tokens(self) -> int:
        return self.stats.used_tokens

    def _reclaimable(self) -> int:
        return sum(e.num_tokens for e in self._entries.values() if not e.users)

    def can_fit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` more could be stored, evicting unreferenced entries if needed."""
        return self.budget_tokens - self.stats.used_tokens + self._reclaimable() >= num_tokens

    def get(self, key: str, user: Hashable) -> Optional[torch.Tensor]:
        """The item's embeddings, now also referenced by `user`; None if absent (encode, then `put`)."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        entry.users.add(user)
        self._entries.move_to_end(key)
        return entry.embeddings

    def put(self, key: str, embeddings: torch.Tensor, user: Hashable) -> None:
        if key in self._entries:
            self._entries[key].users.add(user)
            return
        need = embeddings.shape[0]
        if not self.can_fit(need):
            raise RuntimeError(f"encoder cache: {need} tokens do not fit the budget of {self.budget_tokens} "
                               f"({self.stats.used_tokens} held by running requests); the scheduler checks can_fit")
        for old_key in [k for k, e in self._entries.items() if not e.users]:  # oldest first
            if self.budget_tokens - self.stats.used_tokens >= need:
                break
            self.stats.used_tokens -= self._entries.pop(old_key).num_tokens
            self.stats.evictions += 1
        self._entries[key] = _Entry(embeddings, {user})
        self.stats.used_tokens += need

    def release(self, user: Hashable) -> None:
        """`user` (a finished or preempted request) needs none of its items any more."""
        for entry in self._entries.values():
            entry.users.discard(user)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

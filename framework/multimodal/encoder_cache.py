"""The encoder cache's bookkeeping: which items' embeddings are held, budgeted in embedding
tokens (one per placeholder token), and which running requests still need each.

The scheduler (rank 0) owns this; each rank's model runner holds the tensors themselves and
drops the ones this names as evicted. An item is encoded once, in the step whose prefill chunk
first covers part of its placeholder run, and stays while a running request still needs it:
chunked prefill may spread one image over several steps, and requests with the same image (same
content hash) share one entry. Entries no request references stay for later hits and are evicted
oldest first when room is needed. The budget defaults to `max_num_batched_tokens`, raised to the
largest item (vLLM's rule), so any one item always fits once the others are released.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Set


@dataclass
class _Entry:
    num_tokens: int
    users: Set[Hashable] = field(default_factory=set)


@dataclass
class EncoderCacheStats:
    budget_tokens: int
    used_tokens: int = 0
    hits: int = 0
    misses: int = 0  # items encoded
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

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _reclaimable(self) -> int:
        return sum(e.num_tokens for e in self._entries.values() if not e.users)

    def can_fit(self, num_tokens: int) -> bool:
        """Whether an item of `num_tokens` could be added, evicting unreferenced entries if needed."""
        return self.budget_tokens - self.stats.used_tokens + self._reclaimable() >= num_tokens

    def acquire(self, key: str, user: Hashable) -> bool:
        """`user` needs a held item: True (a hit), or False when it must be encoded (then `add`)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        if user not in entry.users:
            self.stats.hits += 1
        entry.users.add(user)
        self._entries.move_to_end(key)
        return True

    def add(self, key: str, num_tokens: int, user: Hashable) -> List[str]:
        """Hold a newly encoded item for `user`; returns the keys evicted to make room."""
        if not self.can_fit(num_tokens):
            raise RuntimeError(f"encoder cache: {num_tokens} tokens do not fit the budget of {self.budget_tokens} "
                               f"({self.stats.used_tokens} held); the scheduler checks can_fit first")
        evicted = []
        for old in [k for k, e in self._entries.items() if not e.users]:  # oldest first
            if self.budget_tokens - self.stats.used_tokens >= num_tokens:
                break
            self.stats.used_tokens -= self._entries.pop(old).num_tokens
            self.stats.evictions += 1
            evicted.append(old)
        self._entries[key] = _Entry(num_tokens, {user})
        self.stats.used_tokens += num_tokens
        self.stats.misses += 1
        return evicted

    def release(self, user: Hashable, key: Optional[str] = None) -> None:
        """`user` no longer needs item `key` (its prefill passed it), or any item (finished, preempted)."""
        entries = [self._entries[key]] if key in self._entries else [] if key is not None else self._entries.values()
        for entry in entries:
            entry.users.discard(user)

    def discard(self, key: str) -> None:
        """Forget an item whose encoding failed (the runner holds nothing for it)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stats.used_tokens -= entry.num_tokens

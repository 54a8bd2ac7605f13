"""The processed-input cache: the HF processor's output per item, in host RAM, LRU bounded in bytes.

`multimodal.mm_processor_cache_gib` (vLLM's current name; the seed's `mm_input_cache_gib` and
`VLLM_MM_INPUT_CACHE_GIB` still set it) caps the bytes of the tensors held. A repeated image
(same pixels, same processor kwargs) skips decoding-to-patches entirely. It is not the encoder
cache, which holds the vision tower's output on the device. 0 disables it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, TypeVar

import torch

GiB = 1 << 30
T = TypeVar("T")


def tensor_bytes(data: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in data.values() if isinstance(t, torch.Tensor))


@dataclass
class CacheStats:
    capacity_bytes: int
    bytes: int = 0  # held now
    items: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    too_large: int = 0  # items bigger than the whole cache: processed, never kept

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


class ProcessorCache:
    """Keyed by content hash (which covers the processor kwargs); values report their own size
    through `nbytes`. Safe to share between the server's threads."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = max(0, int(capacity_bytes))
        self._entries: "OrderedDict[str, object]" = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats(self.capacity_bytes)

    def __getstate__(self) -> dict:
        """A copy for another process (the HTTP front's) starts empty, with the same capacity."""
        return {"capacity_bytes": self.capacity_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity_bytes"])

    @classmethod
    def from_gib(cls, gib: float) -> "ProcessorCache":
        return cls(int(gib * GiB))

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def get(self, key: str) -> Optional[T]:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return value

    def put(self, key: str, value: T) -> None:
        size = value.nbytes
        with self._lock:
            if key in self._entries or not self.enabled:
                return
            if size > self.capacity_bytes:
                self.stats.too_large += 1
                return
            while self.stats.bytes + size > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)  # least recently used first
                self.stats.bytes -= old.nbytes
                self.stats.evictions += 1
            self._entries[key] = value
            self.stats.bytes += size
            self.stats.items = len(self._entries)

    def keys(self):
        """Oldest first (the next to go)."""
        with self._lock:
            return list(self._entries)

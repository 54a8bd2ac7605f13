"""The encoder cache: budget in embedding tokens, sharing by content hash, eviction of unreferenced items."""
from __future__ import annotations

import pytest
import torch

from framework.multimodal.encoder_cache import EncoderCache, encoder_budget_tokens


def emb(n: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((n, 4), value)


def test_shared_by_hash_and_kept_while_referenced():
    cache = EncoderCache(10)
    cache.put("a", emb(6, 1.0), user="r1")
    assert cache.get("a", user="r2")[0, 0] == 1.0 and cache.stats.hits == 1
    assert not cache.can_fit(5)  # a's 6 tokens are referenced: only 4 free
    cache.release("r1")
    assert not cache.can_fit(5)  # r2 still needs a
    cache.release("r2")
    assert cache.can_fit(10)  # a may now go
    with pytest.raises(RuntimeError, match="do not fit the budget of 10"):
        cache.put("huge", emb(11), user="r3")


def test_unreferenced_entries_go_oldest_first_and_stay_for_hits():
    cache = EncoderCache(10)
    for key in "abc":
        cache.put(key, emb(3), user=key)
        cache.release(key)
    assert cache.get("a", user="x") is not None  # a hit refreshes a and references it
    cache.put("d", emb(4), user="y")  # needs 3 more than the free 1: b (oldest unreferenced) goes
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.stats.evictions == 1 and cache.used_tokens == 10
    assert cache.get("b", user="z") is None and cache.stats.misses == 1


def test_budget_default_is_raised_to_the_largest_item():
    assert encoder_budget_tokens(2048, 1000) == 2048
    assert encoder_budget_tokens(2048, 16384) == 16384

"""The encoder cache's bookkeeping: budget in embedding tokens, sharing by content hash, eviction."""
from __future__ import annotations

import pytest

from framework.multimodal.encoder_cache import EncoderCache, encoder_budget_tokens


def test_shared_by_hash_and_kept_while_referenced():
    cache = EncoderCache(10)
    assert not cache.acquire("a", "r1")
    assert cache.add("a", 6, user="r1") == []
    assert cache.acquire("a", "r2") and cache.stats.hits == 1
    assert not cache.can_fit(5)  # a's 6 tokens are referenced: only 4 free
    cache.release("r1")
    assert not cache.can_fit(5)  # r2 still needs a
    cache.release("r2", "a")
    assert cache.can_fit(10)  # a may now go
    with pytest.raises(RuntimeError, match="do not fit the budget of 10"):
        cache.add("huge", 11, user="r3")


def test_unreferenced_entries_go_oldest_first_and_stay_for_hits():
    cache = EncoderCache(10)
    for key in "abc":
        cache.add(key, 3, user=key)
        cache.release(key)
    assert cache.acquire("a", "x")  # a hit refreshes a and references it
    assert cache.add("d", 4, user="y") == ["b"]  # needs 3 more than the free 1: b, the oldest unreferenced
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.stats.evictions == 1 and cache.stats.used_tokens == 10 and cache.stats.misses == 4


def test_budget_default_is_raised_to_the_largest_item():
    assert encoder_budget_tokens(2048, 1000) == 2048
    assert encoder_budget_tokens(2048, 16384) == 16384

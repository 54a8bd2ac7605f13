"""Tensor parallelism over four ranks (gloo on CPU, Ray actors): the path issue 18 runs on four GPUs.
Each rank holds one of the tiny model's four query heads; its two KV heads are replicated across
rank pairs. Greedy tokens equal TP=1's, and each rank reads a quarter of the split weights."""
from __future__ import annotations

import logging

import pytest

from helpers import greedy, small_config
from test_tensor_parallel import PROMPTS, replicated_bytes

pytestmark = pytest.mark.slow  # four actors on a 2-core box: ~1 min


@pytest.fixture(scope="module", autouse=True)
def ray_four_cpus():
    """Four logical CPUs: a CPU rank asks for one each (launcher check_room)."""
    import ray
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def test_tp4_matches_tp1_with_replicated_kv_heads(tiny_model):
    model_dir = tiny_model("llama")  # 4 attention heads, 2 KV heads
    expected, (single,) = greedy(small_config(model_dir, 1, max_model_len=128, max_num_seqs=4), PROMPTS, 8)
    ours, ranks = greedy(small_config(model_dir, 4, max_model_len=128, max_num_seqs=4), PROMPTS, 8)
    assert ours == expected
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    replicated = replicated_bytes(model_dir, kv_replicated=True)  # each rank reads one of 2 KV heads...
    kv_proj = replicated - replicated_bytes(model_dir, kv_replicated=False)
    split = single["bytes_read"] - kv_proj - replicated_bytes(model_dir, kv_replicated=False)
    for r in ranks:
        # ...half of the K/V projections, a quarter of every other split weight, the norms whole.
        assert r["bytes_read"] == split // 4 + kv_proj // 2 + replicated_bytes(model_dir, kv_replicated=False)
        assert r["kv_blocks"] == single["kv_blocks"]
        assert r["kv_bytes"] == single["kv_bytes"] // 2  # one KV head of two per rank

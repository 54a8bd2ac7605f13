"""Measured memory is per engine: a multirun's jobs share one process but not one peak."""
from __future__ import annotations

from framework.llm import LLM
from helpers import small_config

MiB = 1 << 20


def test_peak_rss_is_each_engines_own(tiny_model):
    model_dir = tiny_model("llama")
    big = small_config(model_dir, num_gpu_blocks_override=100_000, enable_prefix_caching=True)  # ~400 MiB KV
    with LLM(big) as llm:
        first = llm.stats()["ranks"][0]
    assert first["kv_bytes"] > 300 * MiB
    with LLM(small_config(model_dir)) as llm:
        second = llm.stats()["ranks"][0]
    assert second["kv_bytes"] < 60 * MiB
    assert second["peak_rss_bytes"] < first["peak_rss_bytes"] - 200 * MiB

"""Tensor parallelism on CPU (gloo ranks in Ray actors): TP=2 gives TP=1's greedy tokens, and
each rank reads only its slices of the checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest

from framework import FrameworkConfig
from framework.config import ConfigError
from framework.llm import LLM
from helpers import greedy, small_config

PROMPTS = [[1, 5, 7, 9, 11], [3] * 21, list(range(10, 47)), [200, 7]]
MAX_TOKENS = 8


pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray instance for the module (conftest.py)


def make_config(model_dir, tp: int) -> FrameworkConfig:
    return small_config(model_dir, tp, max_model_len=128, max_num_seqs=4)


def replicated_bytes(model_dir, kv_replicated: bool) -> int:
    """Bytes every rank reads whole: the norms (and K/V projections when KV heads < ranks)."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir)
    norms = c.hidden_size * (2 * c.num_hidden_layers + 1)
    head_dim = c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * c.hidden_size if kv_replicated else 0
    return 4 * (norms + kv)  # float32


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}), ("qwen2", {}), ("llama", {"num_key_value_heads": 1, "vocab_size": 383})],
    ids=["llama", "qwen2-tied-bias", "llama-one-kv-head-odd-vocab"])
def test_tp2_matches_tp1_and_reads_its_slices(tiny_model, arch, overrides):
    model_dir = tiny_model(arch, **overrides)
    expected, (single,) = greedy(make_config(model_dir, 1), PROMPTS, MAX_TOKENS)
    ours, ranks = greedy(make_config(model_dir, 2), PROMPTS, MAX_TOKENS)
    assert ours == expected
    assert [r["rank"] for r in ranks] == [0, 1]
    one_kv_head = overrides.get("num_key_value_heads") == 1
    replicated = replicated_bytes(model_dir, kv_replicated=one_kv_head)
    # An odd vocabulary gives rank 0 one more row (float32) of the embedding and of lm_head.
    config = json.loads((model_dir / "config.json").read_text())
    uneven = 2 * 4 * config["hidden_size"] if config["vocab_size"] % 2 else 0
    # Every split weight is read once in all, every replicated one by each rank...
    assert sum(r["bytes_read"] for r in ranks) == single["bytes_read"] + replicated
    for r in ranks:
        # ...so each rank reads half of the split bytes: nothing beyond its own slices.
        assert r["bytes_read"] <= (single["bytes_read"] - replicated) // 2 + replicated + uneven
        assert r["bytes_read"] <= r["weight_bytes"]  # the padded row of an odd vocab is never read
        assert r["load_seconds"] > 0
        # Same block count on every rank; KV heads split (or, with one, replicated) across ranks.
        assert r["kv_blocks"] == single["kv_blocks"]
        assert r["kv_bytes"] == single["kv_bytes"] // (1 if one_kv_head else 2)


def test_tp_not_dividing_heads_fails_before_any_weight(tiny_model, tmp_path):
    # A folder with config.json only: reading any weight would fail with another error.
    shutil.copy(tiny_model("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3: must divide .*num_attention_heads=4"):
        LLM(make_config(tmp_path, 3))


def test_scores_at_tp2_equal_tp1(tiny_model):
    """LLM.score (what task=eval sums) goes through rank 0's engine in its actor: same NLL."""
    model_dir = tiny_model("llama")
    windows = [PROMPTS[2], PROMPTS[1]]
    with LLM(make_config(model_dir, 1)) as llm:
        single = llm.score(windows)
    with LLM(make_config(model_dir, 2)) as llm:
        split = llm.score(windows)
    assert len(single) == 2 and all(nll > 0 for nll in single)
    assert split == pytest.approx(single, rel=1e-4)


def test_tp2_async_scheduling_matches_tp1(tiny_model):
    """Async scheduling at TP=2: every rank takes the greedy argmax of its gathered logits into its
    own buffer and fills the next step's placeholders from it, with chunked prefill and preemption
    in the mix (a 7-token step budget, a cache of few blocks)."""
    model_dir = tiny_model("llama")
    tight = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=7, num_gpu_blocks_override=8)
    expected, _ = greedy(small_config(model_dir, 1, **tight), PROMPTS, MAX_TOKENS)
    ours, ranks = greedy(small_config(model_dir, 2, async_scheduling=True, **tight), PROMPTS, MAX_TOKENS)
    assert ours == expected
    assert [r["async_scheduling"] for r in ranks] == [True, True]
    assert ranks[0]["num_preemptions"] > 0

"""Qwen2.5-VL at TP=2 on CPU (gloo ranks in Ray actors): the decoder is split, the vision tower
replicated on both ranks; the tokens equal TP=1's."""
from __future__ import annotations

import pytest

from tests.test_qwen2_5_vl import REQUESTS, ours, vl_config
from tests.vl_helpers import build_tiny_qwen2_5_vl

pytest.importorskip("torchvision", reason="HF's Qwen2-VL processors need torchvision (a project dependency)")
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_tp2_equals_tp1(tmp_path):
    folder = build_tiny_qwen2_5_vl(tmp_path / "vl")
    requests = [REQUESTS["two_images_of_different_sizes"], REQUESTS["video"], REQUESTS["text_only"]]
    single, single_stats = ours(vl_config(folder, max_num_batched_tokens=32), requests)
    cfg = vl_config(folder, max_num_batched_tokens=32)
    cfg.parallelism.tensor_parallel_size = 2
    from framework.llm import LLM
    from framework import SamplingParams
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        ranks = llm.stats()["ranks"]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in single]
    # the tower is replicated: each rank holds all of it
    assert [r["vision_weight_bytes"] for r in ranks] == [single_stats["vision_weight_bytes"]] * 2

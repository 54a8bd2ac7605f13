"""InternVL at TP=2 on CPU (gloo ranks in Ray actors): the decoder is split, the tower and projector
replicated; the tokens equal HF's, in transformers' layout and in InternVL2's own (whose fused
wqkv is regrouped before each rank takes its heads)."""
from __future__ import annotations

import pytest

from framework import SamplingParams
from framework.llm import LLM
from tests.internvl_helpers import build_tiny_internvl, write_internvl_chat_layout
from tests.test_internvl import REQUESTS, hf_greedy, needs_torchvision, vl_config

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow, needs_torchvision]


def test_tp2_equals_hf_in_both_layouts(tmp_path):
    native = build_tiny_internvl(tmp_path / "native", seed=3, text_model_type="llama")
    remote = write_internvl_chat_layout(native, tmp_path / "remote")
    requests = list(REQUESTS.values())
    want = hf_greedy(native, requests)
    for folder in (native, remote):
        cfg = vl_config(folder, max_num_batched_tokens=16)
        cfg.parallelism.tensor_parallel_size = 2
        with LLM(cfg) as llm:
            outs = llm.generate(requests, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            ranks = llm.stats()["ranks"]
        assert [o.outputs[0].token_ids for o in outs] == want, folder.name
        assert ranks[0]["vision_weight_bytes"] == ranks[1]["vision_weight_bytes"] > 0  # replicated

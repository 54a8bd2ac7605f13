"""Fuyu at TP=2 on CPU (gloo ranks in Ray actors): heads and the MLP are split, the patch
projection replicated on both ranks; the tokens equal HF's."""
from __future__ import annotations

import pytest

from tests.fuyu_helpers import build_tiny_fuyu
from tests.test_fuyu import fuyu_config, hf_greedy, requests_for

pytest.importorskip("torchvision", reason="HF's FuyuProcessor needs torchvision (a project dependency)")
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_tp2_equals_hf(tmp_path):
    import torch
    from transformers import AutoProcessor, FuyuForCausalLM
    folder = build_tiny_fuyu(tmp_path / "fuyu")
    hf = (FuyuForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(folder))
    cases = list(requests_for(hf[1]).values())
    cfg = fuyu_config(folder, max_num_batched_tokens=5)  # a prefill chunk inside the first run too
    cfg.parallelism.tensor_parallel_size = 2
    from framework import SamplingParams
    from framework.llm import LLM
    with LLM(cfg) as llm:
        outs = llm.generate([req for req, _, _ in cases], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        ranks = llm.stats()["ranks"]
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, cases)
    assert [r["vision_weight_bytes"] for r in ranks] == [(2700 + 1) * 64 * 4] * 2  # replicated

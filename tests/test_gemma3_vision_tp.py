"""Gemma-3 with images at TP=2 on CPU (gloo ranks in Ray actors): the decoder is split, the SigLIP
tower and projector replicated; image runs attend both ways on both ranks (the step carries each
token's causal limit), and the tokens equal HF's."""
from __future__ import annotations

import pytest

from framework import SamplingParams
from framework.llm import LLM
from tests.gemma3_helpers import build_tiny_gemma3
from tests.test_gemma3_vision import REQUESTS, assert_first_logprobs, hf_run, needs_torchvision, vl_config

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow, needs_torchvision]


def test_tp2_equals_hf(tmp_path):
    folder = build_tiny_gemma3(tmp_path / "gemma3", seed=3)
    requests = list(REQUESTS.values())
    want, first = hf_run(folder, requests)
    cfg = vl_config(folder, max_num_batched_tokens=16)
    cfg.parallelism.tensor_parallel_size = 2
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5))
        ranks = llm.stats()["ranks"]
    assert [o.outputs[0].token_ids for o in outs] == want
    for out, hf_first in zip(outs, first):
        assert_first_logprobs(out, hf_first)
    assert ranks[0]["vision_weight_bytes"] == ranks[1]["vision_weight_bytes"] > 0  # replicated

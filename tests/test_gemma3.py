"""Gemma-3's decoder against HF transformers, token for token under greedy decoding: prompts
longer than the sliding window, chunked prefill, preemption, and the multimodal checkpoint run
on text alone."""
from __future__ import annotations

import pytest
import torch

from framework import FrameworkConfig
from framework.config.errors import UserError
from framework.llm import LLM

WINDOW = 8  # tokens; prompts and outputs run well past it
# Longer than the window, and than a 16-token chunk; one prompt shorter than the window.
PROMPTS = [list(range(10, 47)), [5, 9, 3], [7] * 12 + list(range(100, 130)), list(range(200, 222))]

TEXT = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,  # != head_dim: the scale is read from it
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}},
            final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _randomize_norms(model: torch.nn.Module) -> None:
    """HF starts every Gemma norm at weight 0 (scale 1): random offsets test the (1 + w)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)


def hf_expected(model, prompts, max_tokens):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def gemma3_text(tmp_path_factory):
    import transformers as tf
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**TEXT)).eval()
    _randomize_norms(model)
    path = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(path)
    return path, hf_expected(model, PROMPTS, 12)


def _cfg(path, **cache) -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path = str(path)
    cfg.cache.cpu_kvcache_space_gib, cfg.cache.block_size = 0.05, 4
    for key, value in cache.items():
        setattr(cfg.cache, key, value)
    return cfg


def _greedy(cfg, prompts, max_tokens):
    from framework import SamplingParams
    with LLM(cfg) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return [o.token_ids for o in outs], llm


def test_gemma3_text_matches_hf_past_the_window(gemma3_text):
    path, expected = gemma3_text
    ours, llm = _greedy(_cfg(path), PROMPTS, 12)
    assert ours == expected
    assert llm.config.cache.max_model_len == 256  # the full context, not cut to the window

"""What the engine tests share: a small config, our greedy tokens and HF's for the same prompts."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from framework import FrameworkConfig, SamplingParams
from framework.llm import LLM

PROMPTS = [[1, 5, 7, 9, 11], [3] * 21, list(range(10, 47)), [200, 7], list(range(100, 164))]


def small_config(model_dir, tp: int = 1, load_format: str = "auto", **cache) -> FrameworkConfig:
    """A tiny KV cache of 8-token blocks; `cache` sets any other cache.* knob."""
    cfg = FrameworkConfig()
    cfg.model.path, cfg.model.load_format = str(model_dir), load_format
    cfg.parallelism.tensor_parallel_size = tp
    cfg.cache.cpu_kvcache_space_gib, cfg.cache.block_size = 0.05, 8
    for key, value in cache.items():
        setattr(cfg.cache, key, value)
    return cfg


def greedy(cfg: FrameworkConfig, prompts=PROMPTS, max_tokens: int = 10) -> Tuple[List[List[int]], List[Dict[str, Any]]]:
    """Our greedy output tokens (EOS ignored) and every rank's stats."""
    with LLM(cfg) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return [o.token_ids for o in outs], llm.stats()["ranks"]


def hf_greedy(model_dir, prompts=PROMPTS, max_tokens: int = 10) -> List[List[int]]:
    """HF transformers' greedy tokens for each prompt alone, in float32: the reference."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        outs.append(ids[0, len(p):].tolist())
    return outs

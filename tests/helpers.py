"""What the engine tests share: a small config, our greedy tokens and HF's for the same prompts."""
from __future__ import annotations

from pathlib import Path
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


# Small enough to build in well under a second; vocab divisible by 2 for TP tests.
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

def _hf_config(arch: str, **overrides):
    import transformers as tf
    kw = {**TINY, **overrides}
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "llama3":  # Llama 3.x rope scaling
        kw.setdefault("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return tf.LlamaConfig(**kw)
    if arch == "qwen2":
        return tf.Qwen2Config(tie_word_embeddings=True, **kw)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=None, **kw)
    if arch == "granite":
        return tf.GraniteConfig(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
                                logits_scaling=2.0, **kw)
    raise ValueError(arch)


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    import transformers as tf
    torch.manual_seed(seed)
    config = _hf_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path

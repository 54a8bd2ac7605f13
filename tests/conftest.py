"""Shared fixtures: tiny random HF models of each supported architecture, built offline."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

# Triton picks GPU or interpreter mode when first imported: without CUDA, the kernel tests
# need the interpreter, whichever test module imports Triton first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "framework" / "assets" / "pydoc-llama"

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model("qwen2")` -> folder of a random model, built once per session and arch."""
    cache = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(arch), arch, **overrides)
        return cache[key]
    return make


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray instance for one test module; launchers use it and leave it running."""
    import logging

    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

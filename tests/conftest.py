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

from helpers import build_tiny_model  # noqa: E402 (after the environment above)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "framework" / "assets" / "pydoc-llama"


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

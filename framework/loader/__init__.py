"""Weights into a freshly built model, by `model.load_format`."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from framework.config.schema import ModelConfig
from framework.loader.weights import LoadStats, init_dummy, load_safetensors


def load_weights(model: nn.Module, model_cfg: ModelConfig, folder: Path) -> LoadStats:
    if model_cfg.load_format == "dummy":
        return init_dummy(model, model_cfg.seed)
    return load_safetensors(model, folder)

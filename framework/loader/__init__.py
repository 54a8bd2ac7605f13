"""Weights into a freshly built model, by `model.load_format`."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from framework.config.schema import ModelConfig
from framework.loader.weights import LoadStats, init_dummy, load_safetensors
from framework.parallel import ParallelInfo


def load_weights(model: nn.Module, model_cfg: ModelConfig, folder: Path, quantization: str = "none",
                 tp: ParallelInfo = ParallelInfo()) -> LoadStats:
    """`quantization`: the resolved method the weights are held in (never auto)."""
    if model_cfg.load_format == "dummy":
        return init_dummy(model, model_cfg.seed)
    if model_cfg.load_format == "sharded":  # task=save_sharded output: this rank's own file
        from framework.loader.sharded import load_sharded
        return load_sharded(model, folder, quantization, tp)
    return load_safetensors(model, folder)

"""What a model is told when it is built: who it is among the ranks, how each linear layer is
stored, its dtype and longest context, and the multimodal settings.

A model reads nothing process-wide: the same class builds rank 3 of 8 on the `meta` device for
the planner and rank 0 of 1 on a GPU for the engine, from the same ModelContext.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from framework.config.schema import MultimodalConfig
from framework.layers.quantization import QuantResolver
from framework.parallel import ParallelInfo


@dataclass(frozen=True)
class ModelContext:
    hf_config: Any  # the whole config.json (a vision-language model's decoder is its text_config)
    dtype: torch.dtype = torch.float32
    max_model_len: int = 0  # no position reaches it; 0 = the model's own limit
    tp: ParallelInfo = field(default_factory=ParallelInfo)
    quant: QuantResolver = field(default_factory=QuantResolver)  # per layer name: None = full precision
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)

    @property
    def text_config(self) -> Any:
        return getattr(self.hf_config, "text_config", None) or self.hf_config

    @property
    def language_model_only(self) -> bool:
        """Every modality limited to 0: the vision parts are never built nor read."""
        limits = self.multimodal.limit_mm_per_prompt
        return bool(limits) and all(_count(v) == 0 for v in limits.values())


def _count(limit: Any) -> int:
    """A limit as `3` or as `{count: 3, width: ..., height: ...}`."""
    return int(limit.get("count", 1)) if isinstance(limit, dict) else int(limit)

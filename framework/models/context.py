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

    def language_model_only(self, modalities=("image", "video")) -> bool:
        """No modality of the model's may carry an item (every limit 0, or
        multimodal.language_model_only): its vision parts are never built nor read."""
        from framework.multimodal.limits import parse_limits, text_only
        return text_only(parse_limits(self.multimodal.limit_mm_per_prompt, self.multimodal.language_model_only,
                                      modalities))

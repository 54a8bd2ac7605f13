"""Qwen2.5-VL: for now its decoder alone (a Qwen2 decoder with M-RoPE), run on text with every
modality limited to 0; the vision tower and the merger are the next step (models/registry.py
refuses images until then).

Text tokens have equal time, height and width positions, so a text-only prompt rotates exactly
as a 1-D position would (layers/rotary.py), and HF's text-only outputs are matched.
"""
from __future__ import annotations

from typing import Any

from framework.models.context import ModelContext
from framework.models.llama import LlamaForCausalLM


class Qwen2_5_VLForConditionalGeneration(LlamaForCausalLM):
    uses_mrope = True

    def __init__(self, ctx: ModelContext):
        # checkpoints (as published, and as transformers 5 writes them) name the decoder model.*,
        # the tower visual.*, the head lm_head
        super().__init__(ctx, ctx.text_config, prefix="model")

    def vision_modules(self) -> list:
        return []  # not built yet

"""Qwen2.5-VL: the vision tower (models/qwen2_5_vl_vision.py) feeding a Qwen2 decoder with M-RoPE.

The decoder is the Llama family's (models/llama.py) built from `text_config`; its rotary takes
3-row positions (models/mrope.py computes them from each item's grid). The engine asks the
model for two things beyond a text model: `embed_multimodal` (encoder outputs of a batch of
processed items, one tensor per item) and `mrope_positions` (a prompt's [3, T] positions and
its decode delta).

With every modality limited to 0, or `multimodal.language_model_only`, the tower is never built:
its checkpoint tensors are skipped unread and no memory is held for it.
"""
from __future__ import annotations

import math

from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from framework.models.context import ModelContext
from framework.models.llama import LlamaForCausalLM
from framework.models.mrope import MropeItem, mrope_positions
from framework.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer

MODALITIES = ("image", "video")
# the processor's output names of each modality: (pixels, grid)
_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class Qwen2_5_VLForConditionalGeneration(LlamaForCausalLM):
    uses_mrope = True
    modalities = MODALITIES

    def __init__(self, ctx: ModelContext):
        # checkpoints (as published, and as transformers 5 writes them) name the decoder model.*,
        # the tower visual.*, the head lm_head
        super().__init__(ctx, ctx.text_config, prefix="model")
        vision = ctx.hf_config.vision_config
        self.spatial_merge_size = vision.spatial_merge_size
        self.tokens_per_second = getattr(vision, "tokens_per_second", 2)
        self.language_model_only = ctx.language_model_only(MODALITIES)
        # unquantized whatever quantization.method says: nn.Linear layers, not the decoder's
        self.visual = None if self.language_model_only else Qwen2_5_VisionTransformer(vision)

    def vision_modules(self) -> list:
        return [] if self.visual is None else [self.visual]

    def checkpoint_name(self, name: str) -> str:
        return name if name.startswith("visual.") else super().checkpoint_name(name)

    def embed_multimodal(self, items: Sequence[Tuple[str, Mapping[str, torch.Tensor]]]) -> List[torch.Tensor]:
        """(modality, processor outputs) of each item -> its embeddings [tokens, hidden], in order.
        All items go through the tower in one call (attention never crosses items)."""
        if self.visual is None:
            raise RuntimeError("the vision tower was not built (language_model_only)")
        pixels, grids = [], []
        for modality, data in items:
            pixel_key, grid_key = _KEYS[modality]
            pixels.append(data[pixel_key])
            grids += [tuple(int(x) for x in g) for g in data[grid_key].tolist()]
        device = next(self.visual.parameters()).device
        out = self.visual(torch.cat(pixels).to(device), grids)
        return list(out.split([self.visual.num_tokens(g) for g in grids]))

    def dummy_multimodal_input(self, num_tokens: int) -> Tuple[str, Dict[str, torch.Tensor]]:
        """One image of at least `num_tokens` tokens, as the processor would give it (for the
        memory profile): a grid of h x w merge blocks, zero pixels."""
        m = self.spatial_merge_size
        h = max(1, math.isqrt(num_tokens))
        w = -(-num_tokens // h)
        patch_dim = self.visual.args.patch_dim
        return "image", {"pixel_values": torch.zeros(h * m * w * m, patch_dim),
                         "image_grid_thw": torch.tensor([[1, h * m, w * m]])}

    def mrope_positions(self, num_tokens: int, items: Sequence[Tuple[int, str, Mapping[str, torch.Tensor]]]
                        ) -> Tuple[torch.Tensor, int]:
        """items: (offset of the first placeholder, modality, processor outputs) in prompt order."""
        mrope_items = []
        for offset, modality, data in items:
            grid = tuple(int(x) for x in data[_KEYS[modality][1]][0].tolist())
            video = modality == "video"
            seconds = float(data["second_per_grid_ts"][0]) if video and "second_per_grid_ts" in data else 1.0
            mrope_items.append(MropeItem(offset, grid, video, seconds))
        return mrope_positions(num_tokens, mrope_items, self.spatial_merge_size, self.tokens_per_second)

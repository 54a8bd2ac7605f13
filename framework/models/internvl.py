"""InternVL (transformers' `InternVLForConditionalGeneration`): the InternViT tower and MLP
projector (models/internvl_vision.py) feeding a Qwen2 or Llama decoder (models/llama.py).

An image is cut by the processor into tiles of the tower's image_size (dynamic tiling: up to
`max_patches` tiles plus a thumbnail; the seed's `max_dynamic_patch` is mapped onto it in
multimodal/processor.py). Each tile gives tokens_per_tile embeddings (256 for 448-pixel tiles,
14-pixel patches and a 0.5 pixel shuffle), which replace the item's run of <IMG_CONTEXT>
tokens; the <img> and </img> around the run are ordinary text tokens. Positions are plain 1-D.

Checkpoint names (as transformers saves them): the decoder language_model.model.*, the head
language_model.lm_head, the tower vision_tower.*, the projector multi_modal_projector.*. With
every modality limited to 0, or `multimodal.language_model_only`, tower and projector are never
built and their tensors are skipped unread.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from framework.models.context import ModelContext
from framework.models.internvl_vision import (InternVisionArgs, InternVisionModel, MultiModalProjector,
                                              image_features)
from framework.models.llama import LlamaForCausalLM

MODALITIES = ("image",)  # HF's InternVL videos are frames of image tiles with text between: not run here


class InternVLForConditionalGeneration(LlamaForCausalLM):
    modalities = MODALITIES

    def __init__(self, ctx: ModelContext):
        super().__init__(ctx, ctx.text_config, prefix="language_model.model")
        self.vision_args = InternVisionArgs.from_hf(ctx.hf_config)
        self.language_model_only = ctx.language_model_only(MODALITIES)
        # unquantized whatever quantization.method says: plain nn.Linear layers, replicated on every rank
        self.vision_tower = None if self.language_model_only else InternVisionModel(self.vision_args)
        self.multi_modal_projector = (None if self.language_model_only
                                      else MultiModalProjector(self.vision_args, self.args.hidden_size))

    def vision_modules(self) -> list:
        return [] if self.vision_tower is None else [self.vision_tower, self.multi_modal_projector]

    def checkpoint_name(self, name: str) -> str:
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return name
        return f"language_model.{name}" if name.startswith("lm_head") else super().checkpoint_name(name)

    def embed_multimodal(self, items: Sequence[Tuple[str, Mapping[str, torch.Tensor]]]) -> List[torch.Tensor]:
        """(modality, processor outputs) of each item -> its embeddings [tiles * tokens_per_tile,
        hidden], in order. All items' tiles go through the tower in one batch."""
        if self.vision_tower is None:
            raise RuntimeError("the vision tower was not built (language_model_only)")
        tiles = [data["pixel_values"] for _, data in items]
        device = self.vision_tower.embeddings.cls_token.device
        out = image_features(self.vision_tower, self.multi_modal_projector, torch.cat(tiles).to(device))
        return list(out.split([t.shape[0] * self.vision_args.tokens_per_tile for t in tiles]))

    def dummy_multimodal_input(self, num_tokens: int) -> Tuple[str, Dict[str, torch.Tensor]]:
        """One image of at least `num_tokens` tokens as the processor would give it (for the
        memory profile): enough zero tiles."""
        a = self.vision_args
        tiles = max(1, -(-num_tokens // a.tokens_per_tile))
        return "image", {"pixel_values": torch.zeros(tiles, a.num_channels, *a.image_size)}

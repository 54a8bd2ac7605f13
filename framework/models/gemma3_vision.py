"""Gemma-3 with images (transformers' `Gemma3ForConditionalGeneration`): the SigLIP tower
(models/siglip.py), the multimodal projector, and the decoder of models/gemma3.py.

Facts from HF's modeling_gemma3.py:
- the projector average-pools the tower's (image_size / patch)^2 patch grid down to
  mm_tokens_per_image tokens (256 on the published models: 64x64 patches pooled 4x4), applies
  `mm_soft_emb_norm` (Gemma's RMSNorm, scale 1 + w, in float32, eps = the tower's
  layer_norm_eps) and multiplies by `mm_input_projection_weight` [vision hidden, text hidden];
- text embeddings are scaled by sqrt(hidden); image embeddings are not;
- an image is written by the processor as `\\n\\n<start_of_image>`, mm_tokens_per_image image
  tokens, `<end_of_image>\\n\\n`; the prompt carries `<start_of_image>` where it goes;
- the image tokens of one image attend to each other both ways (HF's token_type_ids mask: causal
  OR same image, and for sliding layers also inside the window); the engine passes each token's
  causal limit to attention (kernels/attention.py) and keeps such a run in one prefill chunk;
- pan-and-scan (`do_pan_and_scan` in mm_processor_kwargs) adds crops: one item becomes the
  original and each crop, each its own image run, with text between (`run_token_ids`).

Checkpoint names: the decoder language_model.model.*, the tower vision_tower.* (transformers 5) or
vision_tower.vision_model.* (the published checkpoints: renamed as loaded), the projector
multi_modal_projector.*. With every modality limited to 0, or `multimodal.language_model_only`,
tower and projector are never built and their tensors are skipped unread. The tower is
replicated on every tensor-parallel rank: SigLIP-So400m is 0.4B parameters (0.8 GiB in bf16),
one pass per image; splitting it would add two all-reduces per layer for a small share of a
27B model's memory.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from framework.config.errors import UserError
from framework.models.context import ModelContext
from framework.models.gemma3 import Gemma3ForCausalLM
from framework.models.siglip import SiglipArgs, SiglipVisionTower

MODALITIES = ("image",)
_PUBLISHED_TOWER = "vision_tower.vision_model."  # the published checkpoints' tower prefix


class Gemma3Projector(nn.Module):
    def __init__(self, vision: SiglipArgs, text_hidden: int, tokens_per_image: int):
        super().__init__()
        side = math.isqrt(tokens_per_image)
        if side * side != tokens_per_image or vision.patches_per_side % side:
            raise UserError(f"mm_tokens_per_image={tokens_per_image} must be a square whose side divides the "
                            f"{vision.patches_per_side}x{vision.patches_per_side} patch grid")
        self.patches_per_side, self.pool = vision.patches_per_side, vision.patches_per_side // side
        self.eps = vision.eps
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision.hidden_size, text_hidden))
        self.mm_soft_emb_norm = nn.Module()  # holds `weight` under the checkpoint's name
        self.mm_soft_emb_norm.weight = nn.Parameter(torch.zeros(vision.hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[images, patches, vision hidden] -> [images, tokens_per_image, text hidden]."""
        n, _, width = features.shape
        grid = features.transpose(1, 2).reshape(n, width, self.patches_per_side, self.patches_per_side)
        x = nn.functional.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.mm_soft_emb_norm.weight.float())
        return torch.matmul(h.to(x.dtype), self.mm_input_projection_weight).to(features.dtype)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    modalities = MODALITIES

    def __init__(self, ctx: ModelContext):
        super().__init__(ctx, prefix="language_model.model")
        hf = ctx.hf_config
        self.image_token_id = int(getattr(hf, "image_token_id", None) or hf.image_token_index)
        self.tokens_per_image = self.bidirectional_run_tokens(hf)
        self.vision_args = SiglipArgs.from_hf(hf.vision_config)
        self.language_model_only = ctx.language_model_only(MODALITIES)
        # each image's (or crop's) tokens see each other both ways: a run the scheduler never splits
        self.bidirectional_mm_run_tokens = 0 if self.language_model_only else self.tokens_per_image
        # unquantized whatever quantization.method says: plain nn.Linear layers, replicated on every rank
        self.vision_tower = None if self.language_model_only else SiglipVisionTower(self.vision_args)
        self.multi_modal_projector = (None if self.language_model_only else
                                      Gemma3Projector(self.vision_args, self.args.hidden_size, self.tokens_per_image))

    @staticmethod
    def bidirectional_run_tokens(hf_config) -> int:
        """The longest run of tokens that attend to each other both ways: one image's (or crop's)."""
        return int(hf_config.mm_tokens_per_image)

    def vision_modules(self) -> list:
        return [] if self.vision_tower is None else [self.vision_tower, self.multi_modal_projector]

    def checkpoint_name(self, name: str) -> str:
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return name
        return super().checkpoint_name(name)

    def checkpoint_tensors(self, name: str, tensor) -> Iterator[Tuple[str, object]]:
        """The published checkpoints keep the tower under vision_tower.vision_model.*."""
        if name.startswith(_PUBLISHED_TOWER):
            name = "vision_tower." + name[len(_PUBLISHED_TOWER):]
        yield name, tensor

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [N, C, S, S] -> [N, tokens_per_image, text hidden]."""
        if self.vision_tower is None:
            raise RuntimeError("the vision tower was not built (language_model_only)")
        weight = self.multi_modal_projector.mm_input_projection_weight
        return self.multi_modal_projector(self.vision_tower(pixels.to(weight.device, weight.dtype)))

    def embed_multimodal(self, items: Sequence[Tuple[str, Mapping[str, torch.Tensor]]]) -> List[torch.Tensor]:
        """Each item's run [run tokens, hidden]: its images' (the original, then any pan-and-scan
        crops) tokens in order; the text between crops (`run_token_ids`) keeps its scaled text
        embeddings. All items' images go through the tower in one batch."""
        pixels = [data["pixel_values"] for _, data in items]
        features = self.image_features(torch.cat(pixels)).split([p.shape[0] for p in pixels])
        outs = []
        for (_, data), images in zip(items, features):
            images = images.reshape(-1, images.shape[-1])
            run = data.get("run_token_ids")
            if run is None:
                outs.append(images)
                continue
            run = run.to(images.device)
            out = self.embed_input_ids(run)
            image = run == self.image_token_id
            if int(image.sum()) != images.shape[0]:
                raise ValueError(f"Gemma-3: {images.shape[0]} image embeddings for {int(image.sum())} image tokens")
            out[image] = images.to(out.dtype)
            outs.append(out)
        return outs

    def dummy_multimodal_input(self, num_tokens: int) -> Tuple[str, Dict[str, torch.Tensor]]:
        """Enough zero images for `num_tokens` tokens (for the memory profile)."""
        a = self.vision_args
        images = max(1, -(-num_tokens // self.tokens_per_image))
        return "image", {"pixel_values": torch.zeros(images, a.num_channels, a.image_size, a.image_size)}

"""InternVL's vision side: the InternViT tower, the pixel shuffle and the MLP projector.

Facts from HF's modeling_internvl.py: each image tile (image_size x image_size pixels) becomes
patches through one strided convolution, a class token is prepended and absolute position
embeddings added; every block is pre-norm attention and MLP, each branch scaled per channel
(lambda_1, lambda_2) before its residual add. The chosen layer's features lose the class token,
are pixel-shuffled (downsample_ratio 0.5 folds each 2x2 patch block into one vector of 4x the
width) and projected by LayerNorm -> Linear -> act -> Linear into the decoder's width.

Tiles are fixed-size and attend only within themselves, so a batch of tiles is one dense
[tiles, 1 + patches, width] tensor and attention is plain SDPA. Module names follow the
checkpoint (vision_tower.*, multi_modal_projector.*) so tensors load by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.errors import UserError
from framework.layers.vision import VisionMLP, activation

def _pair(value: Any) -> Tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


@dataclass(frozen=True)
class InternVisionArgs:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    num_channels: int
    norm_type: str  # layer_norm | rms_norm
    eps: float
    qkv_bias: bool
    qk_norm: bool
    final_norm: bool  # not use_mean_pooling: a LayerNorm after the last block
    hidden_act: str
    downsample_ratio: float
    projector_act: str

    @classmethod
    def from_hf(cls, config: Any) -> "InternVisionArgs":
        v = config.vision_config
        if v.norm_type not in ("layer_norm", "rms_norm"):
            raise UserError(f"vision_config.norm_type={v.norm_type!r} is not supported; supported: layer_norm, rms_norm")
        if not getattr(v, "use_absolute_position_embeddings", True):
            raise UserError("vision_config.use_absolute_position_embeddings=false is not supported")
        layer = getattr(config, "vision_feature_layer", -1)
        if layer != -1:  # every published InternVL reads the last block
            raise UserError(f"vision_feature_layer={layer!r} is not supported; supported: -1 (the last block)")
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy != "default":  # "full" keeps the class token, which the pixel shuffle cannot fold
            raise UserError(f"vision_feature_select_strategy={strategy!r} is not supported; supported: default")
        ratio = float(getattr(config, "downsample_ratio", 0.5))
        if int(1 / ratio) != 1 / ratio:
            raise UserError(f"downsample_ratio={ratio} is not supported; 1 / downsample_ratio must be an integer")
        a = cls(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
                num_heads=v.num_attention_heads, image_size=_pair(v.image_size), patch_size=_pair(v.patch_size),
                num_channels=getattr(v, "num_channels", 3), norm_type=v.norm_type, eps=v.layer_norm_eps,
                qkv_bias=bool(getattr(v, "attention_bias", False)), qk_norm=bool(getattr(v, "use_qk_norm", False)),
                final_norm=not getattr(v, "use_mean_pooling", True), hidden_act=v.hidden_act, downsample_ratio=ratio,
                projector_act=getattr(config, "projector_hidden_act", "gelu"))
        activation(a.hidden_act, "vision_config.hidden_act")
        activation(a.projector_act, "projector_hidden_act")
        return a

    @property
    def grid(self) -> Tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def shuffle(self) -> int:
        """Patches a side folded into one token (2 for downsample_ratio 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        rows, cols = self.grid
        return (rows // self.shuffle) * (cols // self.shuffle)


class VisionRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _norm(a: InternVisionArgs, hidden: int) -> nn.Module:
    return nn.LayerNorm(hidden, eps=a.eps) if a.norm_type == "layer_norm" else VisionRMSNorm(hidden, a.eps)


class PatchEmbeddings(nn.Module):
    def __init__(self, a: InternVisionArgs):
        super().__init__()
        self.projection = nn.Conv2d(a.num_channels, a.hidden_size, kernel_size=a.patch_size, stride=a.patch_size)


class VisionEmbeddings(nn.Module):
    def __init__(self, a: InternVisionArgs):
        super().__init__()
        rows, cols = a.grid
        self.image_size = a.image_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.hidden_size))
        self.patch_embeddings = PatchEmbeddings(a)
        self.position_embeddings = nn.Parameter(torch.zeros(1, rows * cols + 1, a.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != self.image_size:  # the processor always cuts tiles of image_size
            raise ValueError(f"InternVL tiles must be {self.image_size} pixels, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)  # [tiles, patches, hidden]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings


class VisionAttention(nn.Module):
    def __init__(self, a: InternVisionArgs):
        super().__init__()
        h = a.hidden_size
        self.num_heads, self.head_dim = a.num_heads, h // a.num_heads
        self.q_proj = nn.Linear(h, h, bias=a.qkv_bias)
        self.k_proj = nn.Linear(h, h, bias=a.qkv_bias)
        self.v_proj = nn.Linear(h, h, bias=a.qkv_bias)
        self.projection_layer = nn.Linear(h, h)
        # InternViT-6B normalises q and k over the whole width, before the split into heads
        self.q_norm = VisionRMSNorm(h, 1e-6) if a.qk_norm else nn.Identity()
        self.k_norm = VisionRMSNorm(h, 1e-6) if a.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, length, width = x.shape
        split = lambda t: t.view(tiles, length, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_norm(self.q_proj(x))), split(self.k_norm(self.k_proj(x))), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # every token of a tile sees the whole tile
        return self.projection_layer(out.transpose(1, 2).reshape(tiles, length, width))


class VisionLayer(nn.Module):
    def __init__(self, a: InternVisionArgs):
        super().__init__()
        self.attention = VisionAttention(a)
        self.mlp = VisionMLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        self.layernorm_before = _norm(a, a.hidden_size)
        self.layernorm_after = _norm(a, a.hidden_size)
        self.lambda_1 = nn.Parameter(torch.ones(a.hidden_size))  # per-channel branch scales
        self.lambda_2 = nn.Parameter(torch.ones(a.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class VisionEncoder(nn.Module):
    def __init__(self, a: InternVisionArgs):
        super().__init__()
        self.layer = nn.ModuleList(VisionLayer(a) for _ in range(a.num_layers))


class InternVisionModel(nn.Module):
    """Tiles [N, C, H, W] -> the last block's features [N, 1 + patches, hidden] (class token first)."""

    def __init__(self, a: InternVisionArgs):
        super().__init__()
        self.args = a
        self.embeddings = VisionEmbeddings(a)
        self.encoder = VisionEncoder(a)
        self.layernorm = nn.LayerNorm(a.hidden_size, eps=a.eps) if a.final_norm else nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class MultiModalProjector(nn.Module):
    def __init__(self, a: InternVisionArgs, text_hidden: int):
        super().__init__()
        width = a.hidden_size * a.shuffle ** 2
        self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.act = activation(a.projector_act, "projector_hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


def pixel_shuffle(features: torch.Tensor, s: int) -> torch.Tensor:
    """[N, rows, cols, C] -> [N, rows/s, cols/s, C*s*s] in HF's order: columns are folded first
    (each run of s neighbours in a row), then rows, with the two transposes HF makes."""
    n, rows, cols, c = features.shape
    if rows % s or cols % s:
        raise ValueError(f"a {rows}x{cols} patch grid cannot be folded by {s}")
    x = features.reshape(n, rows, cols // s, c * s).permute(0, 2, 1, 3)
    x = x.reshape(n, cols // s, rows // s, c * s * s).permute(0, 2, 1, 3)
    return x.contiguous()


def image_features(tower: InternVisionModel, projector: MultiModalProjector, tiles: torch.Tensor) -> torch.Tensor:
    """Tiles [N, C, H, W] -> [N * tokens_per_tile, text hidden], tile by tile in order."""
    a = tower.args
    x = tower(tiles.to(tower.embeddings.cls_token.dtype))[:, 1:]  # the class token is not an image token
    rows, cols = a.grid
    x = pixel_shuffle(x.reshape(x.shape[0], rows, cols, -1), a.shuffle)
    return projector(x.reshape(-1, x.shape[-1]))

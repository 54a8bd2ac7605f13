"""The SigLIP vision tower (Gemma-3's image encoder), read from its checkpoint tensor names.

Facts from HF's modeling_siglip.py: an image of image_size x image_size pixels becomes
(image_size / patch_size)^2 patches through one strided convolution (no class token), plus a
learned position embedding per patch; each block is pre-LayerNorm attention (q/k/v/out with
biases, scale head_dim ** -0.5, every patch sees every patch) and a pre-LayerNorm MLP
(fc1 -> gelu_tanh -> fc2); a LayerNorm closes the tower. The attention-pooling head
(`vision_use_head`) is not run: Gemma-3 reads the last hidden state, so its tensors are skipped.

Images are fixed-size and attend only within themselves: a batch is one dense
[images, patches, hidden] tensor and attention is plain SDPA. Module names follow transformers'
checkpoint (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.errors import UserError
from framework.layers.vision import VisionMLP, activation



def _side(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if value[0] != value[-1]:
            raise UserError(f"vision_config: non-square {value} is not supported")
        return int(value[0])
    return int(value)


@dataclass(frozen=True)
class SiglipArgs:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, v: Any) -> "SiglipArgs":
        act = getattr(v, "hidden_act", "gelu_pytorch_tanh")
        activation(act, "vision_config.hidden_act")  # an unsupported one is refused here, before any weight
        return cls(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
                   num_heads=v.num_attention_heads, image_size=_side(v.image_size), patch_size=_side(v.patch_size),
                   num_channels=getattr(v, "num_channels", 3), eps=getattr(v, "layer_norm_eps", 1e-6), hidden_act=act)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipEmbeddings(nn.Module):
    def __init__(self, a: SiglipArgs):
        super().__init__()
        self.image_size = a.image_size
        self.patch_embedding = nn.Conv2d(a.num_channels, a.hidden_size, kernel_size=a.patch_size, stride=a.patch_size)
        self.position_embedding = nn.Embedding(a.patches_per_side ** 2, a.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):  # the processor resizes to it
            raise ValueError(f"SigLIP images must be {self.image_size}x{self.image_size} pixels, "
                             f"got {tuple(pixels.shape[-2:])}")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, a: SiglipArgs):
        super().__init__()
        h = a.hidden_size
        self.num_heads, self.head_dim = a.num_heads, h // a.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, length, width = x.shape
        split = lambda t: t.view(images, length, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(images, length, width))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, a: SiglipArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(a.hidden_size, eps=a.eps)
        self.self_attn = SiglipAttention(a)
        self.layer_norm2 = nn.LayerNorm(a.hidden_size, eps=a.eps)
        self.mlp = VisionMLP(a.hidden_size, a.intermediate_size, a.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, a: SiglipArgs):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(a) for _ in range(a.num_layers))


class SiglipVisionTower(nn.Module):
    """Images [N, C, S, S] -> the last hidden state [N, patches, hidden], post-LayerNorm."""

    def __init__(self, a: SiglipArgs):
        super().__init__()
        self.args = a
        self.embeddings = SiglipEmbeddings(a)
        self.encoder = SiglipEncoder(a)
        self.post_layernorm = nn.LayerNorm(a.hidden_size, eps=a.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

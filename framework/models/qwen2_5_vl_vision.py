"""The Qwen2.5-VL vision tower: pixel patches in, one embedding per merged 2x2 patch block out.

Layout of its input (what the HF processor writes, `pixel_values` + `grid_thw` per item): each
item is a grid of t x h x w patches (t temporal patches of `temporal_patch_size` frames, h x w
spatial patches of `patch_size` pixels); rows are ordered frame by frame, then by merge block
(m x m patches, m = spatial_merge_size) in row-major block order, then row-major inside a block.
So every m*m consecutive rows become one LLM token in the patch merger.

Blocks attend within windows of `window_size` pixels (window_size // patch_size // m merge
blocks a side), except those in `fullatt_block_indexes`, which attend over a whole frame. We
reorder the rows once so that each window is contiguous, run every block on segments, and put
the merged tokens back in the processor's order at the end.

The tower is replicated on every tensor-parallel rank, not sharded: it is ~0.67B parameters for
every Qwen2.5-VL size (small next to the 3B-72B decoder), it runs once per item rather than once
per token, and a sharded tower would add two all-reduces per block for little memory saved.
The planner (framework/memory/encoder.py) counts it the same way.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from framework.layers.vision import activation


@dataclass(frozen=True)
class VisionArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    out_hidden_size: int
    fullatt_block_indexes: Tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @classmethod
    def from_hf(cls, v: Any) -> "VisionArgs":
        rope = getattr(v, "rope_parameters", None) or {}
        return cls(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                   num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                   temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                   window_size=v.window_size, out_hidden_size=v.out_hidden_size,
                   fullatt_block_indexes=tuple(v.fullatt_block_indexes), hidden_act=v.hidden_act,
                   rope_theta=float(rope.get("rope_theta", getattr(v, "rope_theta", 10000.0))))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


class VisionRMSNorm(nn.Module):
    """RMSNorm computed in float32, the weight applied after casting back (as the checkpoint expects)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d has kernel == stride == one patch, so it is a linear map of each
    flattened patch: we hold its weight as [hidden, C*T*P*P] and reshape it at load time."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.proj = nn.Linear(a.patch_dim, a.hidden_size, bias=False)
        self.proj.weight.requires_grad_(False)
        self.proj.weight.weight_loader = self._load_conv_weight

    @staticmethod
    def _load_conv_weight(param: nn.Parameter, loaded, shard_id=None) -> None:
        loaded = loaded.materialize() if hasattr(loaded, "materialize") else loaded
        param.copy_(loaded.reshape(param.shape))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


class VisionRotary(nn.Module):
    """2-D rotary: half of each head's rotated pairs follow the patch row, half its column."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        dim = a.head_dim // 2  # frequencies per axis: head_dim // 4
        inv_freq = 1.0 / a.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        angles = torch.cat([rows[:, None].float() * self.inv_freq, cols[:, None].float() * self.inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)  # [N, head_dim], rotate-half layout
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim]; rotation in float32, result in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: Sequence[int],
                      scale: float) -> torch.Tensor:
    """Bidirectional attention inside each segment [bounds[i], bounds[i+1]) of the rows.

    q, k, v: [N, heads, head_dim]. Segments of equal length (most windows are full) run as one
    batched SDPA call, so a large image is a few calls, not one per window, and no N x N mask
    is ever built."""
    out = torch.empty_like(q)
    starts_by_len = defaultdict(list)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            starts_by_len[end - start].append(start)
    for length, starts in starts_by_len.items():
        rows = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).flatten()
        n = len(starts)
        qs, ks, vs = (t[rows].view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)  # [n, heads, length, head_dim]
        out[rows] = o.transpose(1, 2).reshape(n * length, *q.shape[1:])
    return out


class VisionAttention(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.num_heads, self.head_dim = a.num_heads, a.head_dim
        self.qkv = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=True)
        self.proj = nn.Linear(a.hidden_size, a.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, bounds: Sequence[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = segment_attention(q, k, v, bounds, self.head_dim ** -0.5)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionMLP(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=True)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=True)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=True)
        self.act = activation(a.hidden_act, "vision_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.norm1 = VisionRMSNorm(a.hidden_size)
        self.norm2 = VisionRMSNorm(a.hidden_size)
        self.attn = VisionAttention(a)
        self.mlp = VisionMLP(a)

    def forward(self, x: torch.Tensor, bounds: Sequence[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bounds, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """m*m neighbouring patches -> one LLM token: norm, concatenate, a two-layer GELU MLP.
    (`mlp` is a Sequential so the checkpoint's `mlp.0` / `mlp.2` names load as they are.)"""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.merged_dim = a.hidden_size * a.spatial_merge_size ** 2
        self.ln_q = VisionRMSNorm(a.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 nn.Linear(self.merged_dim, a.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


@dataclass
class VisionLayout:
    """Where each patch goes for one batch of items, computed from their grids alone."""
    patch_order: torch.Tensor  # [patches]: input row of each row in window order
    token_restore: torch.Tensor  # [tokens]: merged token (window order) of each output token
    rows: torch.Tensor  # [patches] patch row within its frame, in window order
    cols: torch.Tensor  # [patches] patch column within its frame, in window order
    window_bounds: List[int]  # segment starts + end for window attention
    frame_bounds: List[int]  # ... for full attention (one segment a frame)


def vision_layout(grids: Sequence[Tuple[int, int, int]], a: VisionArgs, device=None) -> VisionLayout:
    m = a.spatial_merge_size
    unit = m * m
    side = max(1, a.window_size // m // a.patch_size)  # merge blocks along a window's side
    unit_order, rows, cols = [], [], []
    window_bounds, frame_bounds = [0], [0]
    first_unit = 0
    for t, h, w in grids:
        hm, wm = h // m, w // m
        units = torch.arange(t * hm * wm).view(t, hm, wm) + first_unit
        for frame in range(t):
            for top in range(0, hm, side):
                for left in range(0, wm, side):
                    window = units[frame, top:top + side, left:left + side]
                    unit_order.append(window.flatten())
                    window_bounds.append(window_bounds[-1] + window.numel() * unit)
            frame_bounds.append(frame_bounds[-1] + hm * wm * unit)
        first_unit += t * hm * wm
    order = torch.cat(unit_order)
    # a merge unit u (block row br, block column bc of its frame) holds patches u*m*m + (i*m + j)
    inner = torch.arange(unit)
    patch_order = (order[:, None] * unit + inner).flatten()
    # patch row/column of each reordered row, from its unit's place in the frame
    unit_rc = torch.cat([torch.stack(torch.meshgrid(torch.arange(h // m), torch.arange(w // m), indexing="ij"),
                                     dim=-1).view(-1, 2).repeat(t, 1) for t, h, w in grids])
    block = unit_rc[order]  # [units, 2] in window order
    rows = (block[:, 0:1] * m + inner // m).flatten()
    cols = (block[:, 1:2] * m + inner % m).flatten()
    return VisionLayout(patch_order=patch_order.to(device), token_restore=torch.argsort(order).to(device),
                        rows=rows.to(device), cols=cols.to(device),
                        window_bounds=window_bounds, frame_bounds=frame_bounds)


class Qwen2_5_VisionTransformer(nn.Module):
    """`forward(pixel_values [patches, C*T*P*P], grids [(t, h, w), ...])` -> [tokens, out_hidden_size],
    the items' tokens in input order (item i has t*h*w / m^2 of them)."""

    def __init__(self, vision_config: Any):
        super().__init__()
        a = self.args = VisionArgs.from_hf(vision_config)
        self.patch_embed = PatchEmbed(a)
        self.rotary = VisionRotary(a)
        self.blocks = nn.ModuleList(VisionBlock(a) for _ in range(a.depth))
        self.merger = PatchMerger(a)
        for p in self.parameters():
            p.requires_grad_(False)

    def num_tokens(self, grid: Tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.args.spatial_merge_size ** 2

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Tuple[int, int, int]]) -> torch.Tensor:
        grids = [tuple(int(x) for x in g) for g in grids]
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (expected, self.args.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the grids {grids} need "
                             f"({expected}, {self.args.patch_dim})")
        layout = vision_layout(grids, self.args, pixel_values.device)
        x = self.patch_embed(pixel_values[layout.patch_order])
        cos, sin = self.rotary(layout.rows, layout.cols)
        full = set(self.args.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, layout.frame_bounds if i in full else layout.window_bounds, cos, sin)
        return self.merger(x)[layout.token_restore]

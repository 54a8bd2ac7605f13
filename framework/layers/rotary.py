"""Rotary position embedding tables, including Llama 3's frequency rescaling."""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_parameters(hf_config: Any) -> Dict[str, Any]:
    """transformers 5 keeps rope settings (theta included) in `rope_parameters`; older configs
    have `rope_theta` and `rope_scaling` apart."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] == "mrope":  # Qwen2-VL's name for default frequencies over 3-row positions
        params["rope_type"] = "default"
    return params


def inverse_frequencies(head_dim: int, params: Dict[str, Any]) -> torch.Tensor:
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen > old_len / low, inv_freq / factor,
                           torch.where(wavelen < old_len / high, inv_freq, blended))
    if rope_type == "dynamic":
        # HF's dynamic NTK starts from the default frequencies and rescales only once a sequence
        # passes max_position_embeddings, which no position here reaches (the context is capped there)
        return inv_freq
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return inv_freq


class RopeTables(NamedTuple):
    """What attention rotates one step's tokens with: token t uses row index[t] of cos and sin."""

    cos: torch.Tensor  # [rows, head_dim / 2] float32
    sin: torch.Tensor
    index: torch.Tensor  # [T] int64


class RotaryEmbedding(nn.Module):
    """The cos/sin tables only: layers/attention.Attention applies them, in the same kernel that
    writes the KV cache (kernels.rotary_store_kv).

    M-RoPE (Qwen2-VL family, `mrope_section` in the rope parameters) gives each token three
    positions (time, height, width); frequency j of a token rotates by the position of the
    section j falls in. Text tokens have three equal positions, so a step of them (every decode
    step) takes the 1-D path; a step with image tokens gathers per-token rows once per forward."""

    def __init__(self, head_dim: int, max_positions: int, params: Dict[str, Any]):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, params).float()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.mrope_section: Optional[List[int]] = params.get("mrope_section")
        if self.mrope_section is not None and sum(self.mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must add up to head_dim / 2 = {head_dim // 2}")

    def forward(self, positions: torch.Tensor) -> RopeTables:
        """positions [T], or [3, T] (M-RoPE: time, height, width rows)."""
        if positions.dim() == 1:
            return RopeTables(self.cos, self.sin, positions)
        if self.mrope_section is None:
            raise ValueError("3-row positions need a model with M-RoPE (mrope_section)")
        # section s of the frequencies takes its angles from position row s
        cos = torch.cat([self.cos[positions[s]][:, lo:hi] for s, (lo, hi) in enumerate(self._bounds())], dim=-1)
        sin = torch.cat([self.sin[positions[s]][:, lo:hi] for s, (lo, hi) in enumerate(self._bounds())], dim=-1)
        return RopeTables(cos, sin, torch.arange(positions.shape[1], device=positions.device))

    def _bounds(self) -> List[Tuple[int, int]]:
        edges = [0]
        for n in self.mrope_section:
            edges.append(edges[-1] + n)
        return list(zip(edges[:-1], edges[1:]))

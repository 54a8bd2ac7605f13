"""Rotary position embedding tables, including Llama 3's frequency rescaling."""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> Dict[str, Any]:
    """transformers 5 keeps rope settings (theta included) in `rope_parameters`; older configs
    have `rope_theta` and `rope_scaling` apart."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
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
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """The cos/sin tables only: layers/attention.Attention applies them, in the same kernel that
    writes the KV cache (kernels.rotary_store_kv)."""

    def __init__(self, head_dim: int, max_positions: int, params: Dict[str, Any]):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, params).float()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

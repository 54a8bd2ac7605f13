"""Attention over the paged KV cache: rotate q and k and write this step's K/V, then attend.

The metadata describes one flat batch of new tokens from many sequences (prefill chunks and
decodes mixed); the kernels read earlier tokens through each sequence's block table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import kernels
from framework.layers.rotary import RopeTables


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token (-1: padding, skipped)
    cu_seqlens_q: torch.Tensor  # [B+1] int32: sequence b owns new-token rows cu[b]:cu[b+1]
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    decode_only: bool  # every sequence adds exactly one token: the split-K decode kernel applies
    max_seq_len: int  # a host-side bound on seq_lens (sizes the decode split without a sync)
    # A model whose sliding-window layers have their own KV group (engine/block_manager.py): their
    # slots and block tables; None: every layer uses the ones above.
    window_slot_mapping: Optional[torch.Tensor] = None
    window_block_tables: Optional[torch.Tensor] = None
    # [T] the last key position each new token sees, when the step holds a bidirectional run
    # (Gemma-3's image tokens see their whole image); None: causal (every other step and model)
    causal_limits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer keeps in the KV cache: every earlier token (full), or the last
    `sliding_window` (a window layer). The KV layout and the planner follow it."""

    num_kv_heads: int  # on this rank
    head_dim: int
    sliding_window: Optional[int] = None


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.spec = AttentionSpec(num_kv_heads, head_dim, sliding_window)
        self.k_cache: Optional[torch.Tensor] = None  # [num_blocks, num_kv_heads, block_size, head_dim]
        self.v_cache: Optional[torch.Tensor] = None

    def forward(self, rope: RopeTables, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q, k, v: un-rotated projections (views of the fused QKV output are fine); `rope`: the
        step's rotary rows (RotaryEmbedding, computed once per forward for all layers)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # One kernel for rotary and the KV write (a decode step pays per launch); the rotated k
        # exists only in the cache.
        window = self.spec.sliding_window or 0
        slots, tables = meta.slot_mapping, meta.block_tables
        if window and meta.window_block_tables is not None:  # this layer's KV lives in the window group
            slots, tables = meta.window_slot_mapping, meta.window_block_tables
        q = kernels.rotary_store_kv(q, k, v, rope.index, rope.cos, rope.sin, self.k_cache, self.v_cache, slots)
        if meta.decode_only:  # a one-token chunk is never inside a longer image run: causal
            out = kernels.paged_decode_attention(q, self.k_cache, self.v_cache, meta.seq_lens, tables, self.scale,
                                                 max_seq_len=meta.max_seq_len, sliding_window=window)
        else:
            out = kernels.paged_attention(q, self.k_cache, self.v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                          tables, self.scale, sliding_window=window,
                                          causal_limits=meta.causal_limits)
        return out.reshape(-1, self.num_heads * self.head_dim)

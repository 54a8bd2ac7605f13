"""Rotary position embedding, NeoX / HF `rotate_half` style, out of place.

For each head vector x = [x1, x2] (halves of head_dim) at position p:
    out = [x1 * cos[p] - x2 * sin[p],  x2 * cos[p] + x1 * sin[p]]
with fp32 `cos`/`sin` tables of shape `[max_pos, head_dim // 2]` built by the caller.

Both the kernel and the reference RETURN NEW contiguous tensors and leave q/k untouched: q and
k are usually strided views into the fused QKV output, and not aliasing them keeps callers
(and HF-parity tests that reuse inputs) free of surprises. The math is done in fp32 and rounded
once to the input dtype.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton


@triton.jit
def _rotate_heads(x_ptr, out_ptr, t, stride_t, stride_h, cos, sin,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    src = x_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    dst = out_ptr + t * (NUM_HEADS * 2 * HALF) + h * (2 * HALF) + d
    tl.store(dst, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(dst + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _cos_sin_row(pos_ptr, cos_ptr, sin_ptr, t, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token t's cos and sin rows, [1, BLOCK_HALF] fp32, loaded once for all of its heads."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * HALF + d, mask=d < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * HALF + d, mask=d < HALF, other=0.0)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token: the cos/sin row is loaded once and reused by every q and k head.
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin_row(pos_ptr, cos_ptr, sin_ptr, t, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, t, stride_qt, stride_qh, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, t, stride_kt, stride_kh, cos, sin, HKV, HALF, BLOCK_HKV, BLOCK_HALF)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> None:
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0], "q [T,Hq,D], k [T,Hkv,D]"
    assert q.shape[2] == k.shape[2] and q.shape[2] % 2 == 0, "head_dim must be even and shared"
    assert cos.shape == sin.shape and cos.shape[1] * 2 == q.shape[2], "cos/sin [max_pos, D//2]"
    assert positions.shape == (q.shape[0],), "positions must be [T]"


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: rotate q `[T, Hq, D]` and k `[T, Hkv, D]`; returns new (q, k), inputs untouched."""
    _check(q, k, positions, cos, sin)
    num_tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos = cos.contiguous()
    sin = sin.contiguous()
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        HQ=hq, HKV=hkv, HALF=half,
        BLOCK_HQ=next_pow2(hq), BLOCK_HKV=next_pow2(hkv), BLOCK_HALF=next_pow2(half), **pdl(q.device)
    )
    return q_out, k_out


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `apply_rotary` (new tensors, fp32 math, one rounding)."""
    _check(q, k, positions, cos, sin)
    c = cos[positions].unsqueeze(1)  # [T, 1, D/2], broadcast over heads
    s = sin[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)

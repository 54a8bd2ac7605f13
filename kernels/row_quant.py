"""Per-token quantization of activations for the W8A8 matmuls (kernels/int8_linear.py, fp8_linear.py).

x [M, K] -> codes [M, K] and one float32 scale per row: s[m] = max(max_k |x[m, k]| / QMAX, MIN_SCALE)
(an all-zero row, a padded graph row, keeps a usable scale); codes x / s clamped to +-QMAX, rounded
half to even for int8, cast (round to nearest) for float8_e4m3fn. One program per row: the absmax
first (one pass when the row fits one tile, else a loop over tiles), then the codes.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton

_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23: adding and subtracting it rounds |v| < 2^22 half to even


@triton.jit
def _codes(x, scale, q_ptr, QMAX: tl.constexpr, TO_INT: tl.constexpr):
    v = tl.div_rn(x, scale)  # IEEE division, as torch divides (`/` is an approximate one here)
    if TO_INT:
        v = (v + _ROUND) - _ROUND  # round half to even, as torch.round
    # e4m3fn has no infinity: an out-of-range cast would be NaN, so clamp first
    return tl.clamp(v, -QMAX, QMAX).to(q_ptr.dtype.element_ty)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                          TO_INT: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_TILE:  # the row stays in registers between the absmax and the codes
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        amax = tl.max(amax, axis=0)
    scale = tl.maximum(tl.div_rn(amax, QMAX), MIN_SCALE)
    tl.store(s_ptr + row, scale)
    if ONE_TILE:
        tl.store(q_row + cols, _codes(x, scale, q_ptr, QMAX, TO_INT), mask=cols < K)
    else:  # the second read of the row mostly hits L2
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + cols, _codes(x, scale, q_ptr, QMAX, TO_INT), mask=k0 + cols < K)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float, min_scale: float,
                  block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: x [M, K] (float, any row stride) -> (codes [M, K] of `dtype`, float32 scales [M]).
    `block_k` caps the tile (a power of two)."""
    assert x.dim() == 2, "x must be [M, K]"
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    tile = min(block_k, next_pow2(k))
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), QMAX=qmax, MIN_SCALE=min_scale,
                                TO_INT=not dtype.is_floating_point, BLOCK_K=tile, ONE_TILE=tile >= k,
                                num_warps=16 if tile >= 8192 else 8 if tile >= 2048 else 4, **pdl(x.device))
    return q, s

"""RMSNorm and residual-add + RMSNorm, rounded exactly like HF `LlamaRMSNorm`.

HF computes `weight * (h.float() * rsqrt(mean(h^2) + eps)).to(dtype)`: the normalised value is
rounded to the activation dtype *before* the weight multiply. The kernel rounds at the same two
points (and the fused variant rounds `x + residual` to the dtype first, as HF's `residual +
hidden` in bf16 does), so greedy decoding matches HF token for token. Gemma's norm multiplies in
float32 and rounds once, at the end: `round_normed=False`.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    new_res_ptr,
    stride_x,
    stride_r,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    # One program per row: a hidden size up to ~16k fits one block, so one pass over HBM.
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # round like a dtype add
        tl.store(new_res_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = h * rstd
    if ROUND_NORMED:
        normed = normed.to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, round_normed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    assert weight.shape == (n,), "weight must be [hidden]"
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_res = None
    r2 = x2  # placeholder pointer when there is no residual (never read)
    if residual is not None:
        assert residual.shape == x.shape, "residual must match x"
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return y, new_res
    block = next_pow2(n)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, y, new_res if new_res is not None else y,
        x2.stride(0), r2.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, ROUND_NORMED=round_normed, BLOCK=block,
        num_warps=min(16, max(1, block // 512)), **pdl(x.device),  # ~16 elements per thread
    )
    return y, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, round_normed: bool = True) -> torch.Tensor:
    """Triton: RMSNorm over the last dim of `x [..., hidden]`; returns a new tensor in x.dtype."""
    return _launch(x, None, weight, eps, round_normed)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, round_normed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: `new_residual = x + residual; y = rms_norm(new_residual)`; returns (y, new_residual)."""
    y, new_res = _launch(x, residual, weight, eps, round_normed)
    assert new_res is not None
    return y, new_res


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, round_normed: bool = True) -> torch.Tensor:
    """Torch reference of `rms_norm` (HF LlamaRMSNorm, output in x.dtype; Gemma's without rounding)."""
    h = x.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if round_normed:
        normed = normed.to(x.dtype)
    return (weight * normed).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, round_normed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `fused_add_rms_norm`."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps, round_normed), new_residual

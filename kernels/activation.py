"""SwiGLU activation: `silu(gate) * up` over the fused gate_up projection's output.

Rounding follows HF (`act_fn(gate_proj(x)) * up_proj(x)` in the activation dtype): silu(gate)
is rounded to the dtype before the multiply, so the kernel and the reference agree bitwise
up to the exp implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import pdl, pdl_enter, tl, triton


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # Grid (rows, column blocks): a row of 2*I elements is split so big I still fills the GPU.
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(y_ptr + row * inter + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton: x `[..., 2*I]` (gate half first, then up) -> `silu(gate) * up` `[..., I]`."""
    assert x.shape[-1] % 2 == 0, "last dim must be 2 * intermediate_size"
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0 or inter == 0:
        return y
    block = 1024
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, y, x2.stride(0), inter, BLOCK=block, num_warps=4, **pdl(x.device))
    return y


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up

"""W8A8 int8: y = x @ W.T on int8 tensor cores, x quantized per token on the fly.

Weights are int8 codes [N, K] with a float32 scale per output row (absmax / 127, quantized at
load by framework/layers/quantization/int8.py, or read from a compressed-tensors checkpoint).
Each call quantizes x [M, K] the same way, one scale per row (token): s_x[m] = max_k |x[m, k]| /
127, codes round-half-even(x / s_x). Then y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] * wq[n, k]:
`torch._int_mm` (cuBLASLt's int8 GEMM, exact int32 sums) computes the sums, and one Triton pass
(`_epilogue_kernel`) applies both scales and the bias and writes x.dtype.

Why: Hopper's int8 tensor cores run at twice the bf16 rate, and the weight is one byte per
value, so batches past the decode sizes (prefill, many sequences) run faster than bf16 cuBLAS
while reading half its weight bytes. The int32 sums are exact; the cost in accuracy is x's
rounding to 8 bits (relative step 1/127 of the row's absmax).

`quantize_rows_int8` is the Triton quantizer; its torch reference `quantize_rows_int8_ref` is the
spec (same codes, same scales) and `int8_linear_ref` (dequantize both, one float32 matmul) the
reference of the whole product.
"""

from __future__ import annotations

import torch

from kernels import row_quant
from kernels._triton import pdl, pdl_enter, tl, triton

QMAX = 127.0
MIN_SCALE = 1e-12 / QMAX  # an all-zero row (a padded graph row) keeps a usable scale
QUANT_BLOCK_K = 16384  # as kernels/fp8_linear.py: every Llama-3.1-8B K fits one tile
MIN_ROWS = 17  # torch._int_mm on CUDA wants more than 16 rows


# M, the step's rows, is not specialized on: M = 1,100 would compile another variant than the
# warm-up's 2,048 (16-divisible) inside a run
@triton.jit(do_not_specialize=["M"])
def _epilogue_kernel(acc_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, stride_am, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    acc = tl.load(acc_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :], mask=ok, other=0)
    y = acc.to(tl.float32) * tl.load(xs_ptr + rows, mask=rows < M, other=0.0)[:, None]
    y = y * tl.load(ws_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def quantize_rows_int8(x: torch.Tensor, block_k: int = QUANT_BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton (kernels/row_quant.py): x [M, K] (float, unit column stride) -> (int8 codes [M, K],
    float32 scales [M]). `block_k` (tests) caps the tile; a power of two."""
    return row_quant.quantize_rows(x, torch.int8, QMAX, MIN_SCALE, block_k)


def quantize_rows_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `quantize_rows_int8` (the spec): the same codes and scales."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # divided by a tensor, not a Python number: CUDA torch turns division by a scalar into a
    # multiplication by its rounded reciprocal (kernels/fp8_linear.py)
    scale = (amax / torch.full_like(amax, QMAX)).clamp(min=MIN_SCALE)
    return torch.round(xf / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8), scale


def scale_output(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """Triton: int32 sums [M, N] times x_scale [M] and w_scale [N] (float32), plus bias -> dtype."""
    m, n = acc.shape
    y = torch.empty((m, n), dtype=dtype, device=acc.device)
    b = bias.contiguous() if bias is not None else y  # placeholder pointer (never read)
    _epilogue_kernel[(triton.cdiv(m, 32), triton.cdiv(n, 128))](
        acc, x_scale, w_scale, b, y, m, n, acc.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128, num_warps=4, **pdl(acc.device))
    return y


def supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """What `int8_linear` takes: bf16/fp16 x [M, K] on CUDA with M >= MIN_ROWS, int8 codes [N, K]
    with K and N multiples of 8 (cuBLASLt's int8 alignment)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and codes.dtype == torch.int8
            and x.dim() == 2 and x.shape[0] >= MIN_ROWS and codes.shape[0] % 8 == 0 and codes.shape[1] % 8 == 0)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M >= MIN_ROWS) times the int8 weight [N, K] (row scales `scale` [N],
    float32), transposed, plus bias [N] -> [M, N] in x.dtype."""
    xq, xs = quantize_rows_int8(x)
    # codes [N, K] row-major is the column-major [K, N] operand cuBLASLt's int8 GEMM wants
    acc = torch._int_mm(xq, codes.t())
    return scale_output(acc, xs, scale.float().contiguous(), bias, x.dtype)


def int8_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `int8_linear`: both operands dequantized, one float32 matmul (exact for
    the int32 sums while |sum| < 2^24, close beyond)."""
    xq, xs = quantize_rows_int8_ref(x)
    y = (xq.float() @ codes.float().T) * xs[:, None] * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

"""W8A8 int8: y = x @ W.T on int8 tensor cores, x quantized per token on the fly.

Weights are int8 codes [N, K] with a float32 scale per output row (absmax / 127, quantized at
load by framework/layers/quantization/int8.py, or read from a compressed-tensors checkpoint).
Each call quantizes x [M, K] the same way, one scale per row (token): s_x[m] = max_k |x[m, k]| /
127, codes round-half-even(x / s_x). Then y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] * wq[n, k]:
One Triton kernel (`_int8_gemm_kernel`) sums the int8 products on int8 tensor cores (exact int32
sums) and applies both scales and the bias before it writes x.dtype. The path before it,
`torch._int_mm` (cuBLASLt) then a Triton epilogue pass over the int32 sums (`gemm="cublas"`), ran
at 0.72-0.92x bf16 cuBLAS at 256 rows on an H200 (BENCHMARKS.md, 2026-12-01).

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
from kernels._triton import grouped_tile, num_sms, pdl, pdl_enter, tl, triton

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


@triton.jit(do_not_specialize=["M"])  # rows vary per step (above)
def _int8_gemm_kernel(xq_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    x_tile = xq_ptr + rows.to(tl.int64)[:, None] * stride_xm + k[None, :]
    # the weight [N, K] read as [BLOCK_N, BLOCK_K] tiles and transposed: K-major, as int8 wgmma wants
    w_tile = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + k) < K
        a = tl.load(x_tile, mask=(rows < M)[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_tile, mask=(cols < N)[:, None] & k_ok[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    y = acc.to(tl.float32) * tl.load(xs_ptr + rows, mask=rows < M, other=0.0)[:, None]
    y = y * tl.load(ws_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def gemm_tile(m: int, n: int, device: torch.device) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for M rows and N outputs; block_k is 128 (bytes).
    128 x 128 tiles (8 warps, 3 stages) where they fill the card, else 64-wide ones (4 warps, 4
    stages): a decode batch of 256 rows has only 2 x 32 tiles of 128 x 128 against the o
    projection's N = 4,096. On an H200 (kernels.bench_quant --int8, 2026-12-01) 3 stages beat 4 at
    128 x 128 by 18-24% (gate_up at 2,048 rows 450.8 against 574.0 µs)."""
    sms = num_sms(device, off_gpu=132)
    block_m = 64 if m <= 64 else 128
    block_n = 128 if triton.cdiv(m, block_m) * triton.cdiv(n, 128) >= sms else 64
    return (block_m, block_n, 8, 3) if block_m * block_n >= 128 * 128 else (block_m, block_n, 4, 4)


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, dtype: torch.dtype, tile: tuple[int, int, int, int] | None = None,
              block_k: int = 128) -> torch.Tensor:
    """Triton: int8 xq [M, K] times int8 codes [N, K] transposed (exact int32 sums), times x_scale
    [M] and w_scale [N] (float32), plus bias [N] -> [M, N] in `dtype`. `tile` (tests, bench)
    overrides `gemm_tile`."""
    m, k = xq.shape
    n = codes.shape[0]
    assert codes.shape == (n, k) and xq.stride(1) == 1 and codes.stride(1) == 1
    y = torch.empty((m, n), dtype=dtype, device=xq.device)
    if m == 0:
        return y
    block_m, block_n, warps, stages = tile or gemm_tile(m, n, xq.device)
    b = bias.contiguous() if bias is not None else y  # placeholder pointer (never read)
    _int8_gemm_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        xq, codes, x_scale, w_scale, b, y, m, n, k, xq.stride(0), codes.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=warps, num_stages=stages, **pdl(xq.device))
    return y


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
                bias: torch.Tensor | None = None, gemm: str = "triton") -> torch.Tensor:
    """x [M, K] (bf16/fp16, M >= MIN_ROWS) times the int8 weight [N, K] (row scales `scale` [N],
    float32), transposed, plus bias [N] -> [M, N] in x.dtype. `gemm="cublas"` (bench): the sums
    by torch._int_mm, then the Triton epilogue."""
    xq, xs = quantize_rows_int8(x)
    if gemm == "triton":
        return int8_gemm(xq, xs, codes, scale.float().contiguous(), bias, x.dtype)
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

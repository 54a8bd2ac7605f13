"""W8A8 fp8: y = x @ W.T on fp8 tensor cores, x quantized per token on the fly.

Weights are float8_e4m3fn codes [N, K] with a float32 scale per output row (quantized at load,
framework/layers/quantization/fp8.py). Each call quantizes the activations x [M, K] the same
way, one scale per row (token): s_x[m] = max_k |x[m, k]| / 448, codes round(x / s_x) in e4m3.
Then y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] * wq[n, k], which `torch._scaled_mm` computes
with row-wise scales (scale_a [M, 1], scale_b [1, N], float32) on Hopper / Ada fp8 tensor cores
(cuBLASLt on sm90 with CUDA >= 12.9, else CUTLASS), accumulating in float32 and writing x.dtype.

Against weight-only fp8 the matmul reads one byte per weight *and* runs at twice the bf16
tensor-core rate, with no dequantized weight copy. The cost is the rounding of x to 3 mantissa
bits (relative error up to 2^-4 per element, mostly averaging out in the dot products).

`quantize_rows` is the Triton quantizer (kernels/row_quant.py, shared with int8). Its torch
reference `quantize_rows_ref` is the spec, and `fp8_linear_ref` (dequantize both, one float32 matmul) is
the reference of the whole product. Triton's CPU interpreter rounds float32 -> e4m3 wrongly near
powers of two (triton 3.9), so the kernel is tested on the GPU only.
"""

from __future__ import annotations

import functools

import torch

from kernels import row_quant

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
MIN_SCALE = 1e-12 / FP8_MAX  # an all-zero row (a padded graph row) keeps a usable scale
# Widest tile a program holds (registers: 16384 float32 over 16 warps is 32 a thread). Every
# Llama-3.1-8B K fits one tile, so a row is read once. On an H200 (2026-11-30, graph replay) tiles
# of 4096 took 6.5 µs for one row of K = 14336 (two passes over four tiles, one SM), 2.0 for K = 4096.
QUANT_BLOCK_K = 16384


def quantize_rows(x: torch.Tensor, block_k: int = QUANT_BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton (kernels/row_quant.py): x [M, K] (any float dtype, unit column stride) ->
    (float8_e4m3fn codes [M, K], float32 scales [M, 1]). `block_k` (tests) caps the tile."""
    q, s = row_quant.quantize_rows(x, FP8, FP8_MAX, MIN_SCALE, block_k)
    return q, s[:, None]


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `quantize_rows` (the spec): the same codes and scales."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # divided by a tensor, not the Python number: on CUDA torch turns division by a scalar into
    # a multiplication by its rounded reciprocal, which is off by an ulp now and then
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=MIN_SCALE)
    # e4m3fn has no infinity: an out-of-range cast is NaN, so clamp (x / scale can round past 448)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def native_fp8(x: torch.Tensor) -> bool:
    """True where fp8 x fp8 matmuls run on tensor cores: a CUDA device of compute capability 8.9
    (Ada) or newer, with `torch._scaled_mm`. Elsewhere the fp8 methods stay weight-only."""
    if not x.is_cuda or not hasattr(torch, "_scaled_mm"):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """What `fp8_linear` takes: 16- or 32-bit float x on a native-fp8 device, and K and N
    multiples of 16 (the fp8 GEMM's alignment)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and codes.dtype == FP8 and native_fp8(x)
            and codes.shape[0] % 16 == 0 and codes.shape[1] % 16 == 0)


# use_fast_accum: Hopper's fp8 MMA accumulates in reduced precision unless cuBLAS promotes the
# partial sums to float32 every few steps. Fast mode skips that: on an H200 (2026-11-30, graph
# replay, Llama-3.1-8B shapes) 1.1-1.3x faster at 8-2048 rows where K = 4096 (gate_up at 256
# rows: 58.4 vs 67.0 µs), but barely for the down projection (K = 14336: 45.2 vs 46.7 µs), whose
# error grows with K: kernels/bench.py --fp8 measured 2.4-3.7e-3 (fast) against 0.7-3e-3 at
# K = 4096 and 3.6-6e-3 against 0.5-5e-3 at K = 14336 (||y - ref|| / ||ref||). And at K = 14336
# with N = 272 and a bias cuBLASLt had no fast kernel at all (CUBLAS_STATUS_NOT_SUPPORTED, torch
# 2.11 + CUDA 13). So fast only up to FAST_ACCUM_MAX_K.
FAST_ACCUM_MAX_K = 8192


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               fast_accum: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times the fp8 weight [N, K] (row scales `scale` [N], float32),
    transposed, plus bias [N] -> [M, N] in x.dtype: `quantize_rows`, then one `torch._scaled_mm`.
    `fast_accum` (tests, bench) overrides the FAST_ACCUM_MAX_K rule."""
    xq, xs = quantize_rows(x)
    # codes [N, K] row-major is the column-major [K, N] operand cuBLASLt wants on Hopper
    return torch._scaled_mm(xq, codes.t(), scale_a=xs, scale_b=scale.view(1, -1), bias=bias,
                            out_dtype=x.dtype,
                            use_fast_accum=x.shape[1] <= FAST_ACCUM_MAX_K if fast_accum is None else fast_accum)


def fp8_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `fp8_linear`: both operands dequantized, one float32 matmul."""
    xq, xs = quantize_rows_ref(x)
    y = (xq.float() @ codes.float().T) * xs * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

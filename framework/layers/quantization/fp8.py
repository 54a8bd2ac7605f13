"""fp8: float8_e4m3fn weights with a per-output-channel float32 scale, quantized at load.

The scale maps each row's absmax onto e4m3's largest finite value (448), so every row uses the
format's full range: 3 mantissa bits give a relative error of at most 2^-4 per weight (tiny
weights fall into the subnormals, absolute error at most 2^-10 of the row's scale).

Two matmuls, chosen per call:
- W8A8 (kernels/fp8_linear.py), where the card has fp8 tensor cores (compute capability >= 8.9)
  and x is bf16/fp16: x is quantized per token on the fly and `torch._scaled_mm` multiplies
  fp8 by fp8 with both row scales applied to the float32 sums. Prefill and decode batches of
  more than WEIGHT_ONLY_MAX_ROWS take it: twice the bf16 tensor-core rate, one byte per weight,
  no dequantized weight copy.
- Weight-only (int8.scaled_linear): the codes convert exactly to the activation dtype and the
  row scale multiplies the output. Decode batches up to WEIGHT_ONLY_MAX_ROWS on GPU stay here
  (the one-row GEMV, the tensor-core GEMV of kernels/fp8_mma_gemv.py at 2-8 rows and the fused
  kernel of quant_matmul measured faster than cuBLAS's fp8 GEMM there, and x stays exact), and so
  do the CPU, cards without fp8 and float32 models.
`quantize_activations=False` (a compressed-tensors checkpoint that quantizes only its weights)
always runs weight-only.
"""
from __future__ import annotations

from typing import Tuple

import torch

from framework.layers.quantization.int8 import RowScaledMethod

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Up to this many rows (tokens) a call stays weight-only on a native-fp8 card: the GEMV at one
# row, kernels/quant_matmul.py above. kernels/bench.py --fp8 on an H200 (2026-11-30, graph replay,
# the four Llama-3.1-8B shapes of a layer together, W8A8 with fast accumulation): 1 row 76.6 µs
# weight-only vs 128 W8A8, 8 rows 83.9 vs 113, 32 rows 105 vs 115, 64 rows 167 vs 115 (cuBLAS's
# fp8 GEMM has a floor of about 15 µs for N = K = 4096 and 41 µs for down, whatever the rows).
WEIGHT_ONLY_MAX_ROWS = 32


def quantize_fp8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float rows [n, k] -> (float8_e4m3fn codes [n, k], float32 scales [n])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    # e4m3fn has no infinity: an out-of-range cast would be NaN, so clamp (rounding can nudge past 448)
    codes = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float()[:, None]).to(dtype)


class Fp8Method(RowScaledMethod):
    name = "fp8"
    code_dtype = FP8
    quantize_rows = staticmethod(quantize_fp8)
    w8a8 = "fp8"  # kernels/fp8_linear.py, on cards of compute capability 8.9 or newer
    weight_only_max_rows = WEIGHT_ONLY_MAX_ROWS

"""int8: symmetric per-output-channel weights; W8A8 past decode sizes on CUDA (Int8Method).

Each row keeps its own float32 scale (absmax / 127), so a row's error is at most half a step
of *its* range. The matmul runs on the integer codes cast to the activation dtype (exact: every
int8 is representable in bf16/fp16) and the scale multiplies the output columns, which avoids
materializing a scaled copy of the weight; on GPU, decode-sized batches use fused kernels that
read the codes directly (kernels/quant_gemv.py, kernels/quant_matmul.py). Past WEIGHT_ONLY_MAX_ROWS
rows on CUDA, Int8Method quantizes x per token too and multiplies on int8 tensor cores
(kernels/int8_linear.py): on an H200 1.02-1.10x bf16 at prefill sizes, 0.72-0.92x at 256 rows,
and 3-5x faster than the weight-only path there, which dequantizes (BENCHMARKS.md, 2026-12-01).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import kernels
from framework.layers.quantization.base import LoadTimeQuant, Spec
from kernels import fp8_mma_gemv as fmg, quant_gemv as qg, quant_matmul as qmm

QMAX = 127  # -128 unused: a symmetric grid keeps zero exact and the range balanced
# Up to this many rows (tokens) a call stays weight-only (the GEMV, then quant_matmul), as fp8
# does (fp8.WEIGHT_ONLY_MAX_ROWS: cuBLAS's 8-bit GEMMs have a floor of 15-41 µs a call on the
# 8B shapes whatever the rows); more rows run W8A8 on int8 tensor cores.
WEIGHT_ONLY_MAX_ROWS = 32


def quantize_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float rows [n, k] -> (int8 codes [n, k], float32 scales [n])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / QMAX  # an all-zero row keeps a usable scale
    codes = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float()[:, None]).to(dtype)


def scaled_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ (scale * codes).T + bias, with the per-row scale applied to the output. On GPU, one decode
    row takes the GEMV (kernels/quant_gemv.py), 2-8 rows of fp8 the MMA GEMV (kernels/fp8_mma_gemv.py,
    where `faster`), and somewhat more rows the fused matmul (kernels/quant_matmul.py); all read one
    byte per weight."""
    x2 = x.reshape(-1, x.shape[-1])
    triton = kernels.use_triton(x)
    if triton and fmg.faster(x2, codes) and fmg.supported(x2, codes, scale):
        y = fmg.fp8_mma_gemv(x2, codes, scale).view(*x.shape[:-1], codes.shape[0])
    elif triton and x2.shape[0] <= qg.DISPATCH_MAX_ROWS:
        y = qg.rowscaled_gemv(x2, codes, scale).view(*x.shape[:-1], codes.shape[0])
    elif triton and x2.shape[0] <= qmm.SMALL_M and qmm.supported(codes, scale):
        y = qmm.quant_matmul(x2, codes, scale).view(*x.shape[:-1], codes.shape[0])
    else:
        y = F.linear(x, codes.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


class RowScaledMethod(LoadTimeQuant):
    """One code per weight and one float32 scale per output row (int8, fp8): subclasses name
    the code dtype and the function that quantizes float rows into (codes, scales)."""

    code_dtype: torch.dtype
    quantize_rows: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]  # float rows -> (codes, scales)

    def storage(self, out_features: int, in_features: int) -> Spec:
        return {"weight": ((out_features, in_features), self.code_dtype),
                "weight_scale": ((out_features,), torch.float32)}

    def quantize(self, layer, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        codes, scale = self.quantize_rows(w)
        return {"weight": codes, "weight_scale": scale}

    # W8A8: past `weight_only_max_rows` rows, where `kernels.<w8a8>_linear_supported`, x is quantized
    # per token too and `kernels.<w8a8>_linear` multiplies on 8-bit tensor cores (looked up by name
    # at each call, so the kernels module stays the one place to swap them)
    w8a8: str
    weight_only_max_rows: int

    def __init__(self, quantize_activations: bool = True):
        self.quantize_activations = quantize_activations

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.quantize_activations and self.uses_w8a8(x2, layer.weight):
            y = getattr(kernels, f"{self.w8a8}_linear")(x2, layer.weight, layer.weight_scale, bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        return scaled_linear(x, layer.weight, layer.weight_scale, bias)

    def uses_w8a8(self, x2: torch.Tensor, codes: torch.Tensor) -> bool:
        """Whether a call over the rows x2 [M, K] runs W8A8 (more than weight_only_max_rows rows, a
        card and dtypes the kernel takes)."""
        return (x2.shape[0] > self.weight_only_max_rows
                and getattr(kernels, f"{self.w8a8}_linear_supported")(x2, codes))


class Int8Method(RowScaledMethod):
    """`quantize_activations`: steps of more than WEIGHT_ONLY_MAX_ROWS tokens on CUDA quantize x
    per token to int8 and multiply on int8 tensor cores (W8A8); fewer rows, the CPU and float32
    models stay weight-only. False (a compressed-tensors checkpoint that quantizes only its
    weights, or its activations some other way) always runs weight-only."""

    name = "int8"
    code_dtype = torch.int8
    quantize_rows = staticmethod(quantize_int8)
    w8a8 = "int8"  # kernels/int8_linear.py
    weight_only_max_rows = WEIGHT_ONLY_MAX_ROWS

"""fp8: float8_e4m3fn weights with a per-output-channel float32 scale; activations stay in the
model dtype.

The scale maps each row's absmax onto e4m3's largest finite value (448), so every row uses the
format's full range: 3 mantissa bits give a relative error of at most 2^-4 per weight (tiny
weights fall into the subnormals, absolute error at most 2^-10 of the row's scale). The matmul
casts the codes to the activation dtype (exact for bf16/fp16/fp32) and scales the output.

torch._scaled_mm would run fp8 x fp8 on Hopper/Ada, but it needs fp8 *activations*: that is
W8A8, a different accuracy trade-off than this weight-only method, so it is not used here.
"""
from __future__ import annotations

from typing import Tuple

import torch

from framework.layers.quantization.int8 import RowScaledMethod

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


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

"""int4: group-wise symmetric 4-bit weights, two per byte; activations stay in the model dtype.

Layout (shared with kernels/quant_gemv.py, kernels/quant_matmul.py and the compressed-tensors loader):
- `codes` uint8 [out, in/2]: column 2j in the low nibble of byte j, column 2j+1 in the high one.
  A nibble holds q + 8 for q in [-8, 7], so zero is code 8 (the unsigned form compressed-tensors
  and GPTQ use too).
- `scale` in the model dtype [out, in/group_size]: group g of a row covers input columns
  [g*group_size, (g+1)*group_size). One group per row is per-channel int4.

The scale is absmax / 7, rounded to the model dtype *before* the codes are computed, so the
stored scale is the one the codes were made for: every weight lands within half a step of its
group's grid and none is clipped.

On GPU (group sizes that are multiples of 16) one row (batch-1 decode) runs the GEMV of
kernels/quant_gemv.py; up to SMALL_M rows run kernels/quant_matmul.py, which unpacks a tile of
codes in registers and feeds tensor cores; more rows a one-pass unpack before cuBLAS. Both read
each code byte once. On an H100 (Llama-3.1-8B shape, through the engine) int4 decodes one
request at 265 tok/s (bf16: 172; 26.6 before these kernels) and serves a 64-request workload at
3,852 tok/s (bf16: 4,119-4,133); BENCHMARKS.md has the commands.
"""
from __future__ import annotations

from math import gcd
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import kernels
from framework.config.errors import ConfigError
from framework.layers.quantization.base import LoadTimeQuant, Spec
from kernels import quant_gemv as qg, quant_matmul as qmm

QMAX = 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7], [n, k] with k even -> uint8 [n, k/2]."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] -> int8 codes in [-8, 7], [n, k]."""
    pairs = torch.stack((codes & 0xF, codes >> 4), dim=-1)
    return pairs.view(codes.shape[0], -1).to(torch.int8) - 8


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """float rows [n, k] -> (uint8 codes [n, k/2], scales [n, k/group_size] in scale_dtype)."""
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)
    scale = (groups.abs().amax(dim=-1) / QMAX).clamp(min=1e-8).to(scale_dtype)
    q = torch.round(groups / scale.float()[..., None]).clamp(-8, QMAX)
    return pack_int4(q.view(n, k)), scale


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The group size is implied: in_features / scale.shape[1]."""
    q = unpack_int4(codes)
    n, k = q.shape
    w = q.view(n, scale.shape[1], -1).to(dtype) * scale.to(dtype)[..., None]
    return w.view(n, k)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]
                ) -> torch.Tensor:
    """x @ dequantized(codes, scale).T + bias. On GPU, decode rows take the GEMV and somewhat more
    the fused matmul (both read half a byte per weight), many rows a one-pass Triton unpack before
    cuBLAS; elsewhere the torch reference unpacks the whole weight, then one matmul."""
    if not (kernels.use_triton(x) and qmm.supported(codes, scale)):
        return F.linear(x, dequantize_int4(codes, scale, x.dtype), bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > qmm.SMALL_M:
        return F.linear(x, qmm.dequantize_int4(codes, scale, x.dtype), bias)
    fused = qg.int4_gemv if x2.shape[0] <= qg.DISPATCH_MAX_ROWS else qmm.quant_matmul
    y = fused(x2, codes, scale).view(*x.shape[:-1], codes.shape[0])
    return y + bias if bias is not None else y


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_group_size(group_size: int, in_features: List[int]) -> None:
    """group_size must divide every quantized layer's input features on this rank (and those
    must be even, two codes per byte). ConfigError lists the sizes that would work."""
    common = 0
    for k in in_features:
        common = gcd(common, k)
    if common % 2:
        raise ConfigError("quantization.method", "int4", f"needs even input features per rank; "
                          f"this model has {sorted(set(in_features))}")
    if common % group_size:
        raise ConfigError("quantization.group_size", group_size,
                          f"must divide every quantized layer's input features per rank "
                          f"({', '.join(map(str, sorted(set(in_features))))}); valid: {_divisors(common)}")


def decoder_in_features(c: Any, tp: int) -> List[int]:
    """Input features per rank of a decoder's linear layers, from config.json: q/k/v and
    gate/up read the whole hidden state; o_proj and down_proj (row-parallel) 1/tp of theirs."""
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    sizes = [c.hidden_size, heads * head_dim // tp]
    if getattr(c, "intermediate_size", None):
        sizes.append(c.intermediate_size // tp)
    return sizes


class Int4Method(LoadTimeQuant):
    name = "int4"
    codes_name = "weight"  # the compressed-tensors variant stores them as `weight_packed`

    def __init__(self, group_size: Optional[int], hf_config: Any = None, tp_size: int = 1):
        self.group_size = group_size  # None: one group per row (per-channel)
        text = getattr(hf_config, "text_config", None) or hf_config
        if group_size and getattr(text, "hidden_size", None) and getattr(text, "num_attention_heads", None):
            # every size at once, in one message (storage() checks each layer again as it is built)
            check_group_size(group_size, decoder_in_features(text, tp_size))

    def storage(self, out_features: int, in_features: int) -> Spec:
        group = self.group_size or in_features
        check_group_size(group, [in_features])  # also catches layers config.json did not describe
        return {self.codes_name: ((out_features, in_features // 2), torch.uint8),
                "weight_scale": ((out_features, in_features // group), torch.get_default_dtype())}

    def quantize(self, layer, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        codes, scale = quantize_int4(w, self.group_size or w.shape[1], layer.weight_scale.dtype)
        return {self.codes_name: codes, "weight_scale": scale}

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return int4_linear(x, getattr(layer, self.codes_name), layer.weight_scale, bias)

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

On GPU (group sizes that are multiples of 16), by rows (tokens) of a call:
- 2 to TINYGEMM_MAX_ROWS, with bf16 activations on CUDA where the layer has the copy: PyTorch's
  tinygemm (kernels/int4_tinygemm.py), on a second copy of the codes in its own layout
  (`weight_int4pack`, `weight_scale_zeros`), repacked as each block of rows is quantized;
- one row on Hopper where the weight's 16-row tiles fit one wave and K is 2,048 or 4,096 (an 8B model's
  qkv and o): kernels/int4_tma_gemv.py (int4_mma_gemv's arithmetic on each program's whole tile,
  brought into shared memory by TMA at once);
- up to 8 rows on CUDA in bf16 / fp16 where the group size is a multiple of 128 (and N of 16):
  kernels/int4_mma_gemv.py (each code unpacked once into an MMA register, x's rows the MMA's
  columns, so 1-8 rows cost about the same);
- one row otherwise: the GEMV of kernels/quant_gemv.py;
- up to SMALL_M rows: kernels/quant_matmul.py (a tile of codes unpacked in registers, tensor cores);
- below DEQUANT_ROWS: kernels/w4a16_matmul.py (the same idea with tiles for many rows), where the
  group size is a multiple of 64;
- from DEQUANT_ROWS (prefill chunks), or for other group sizes: a one-pass unpack to the model
  dtype, then cuBLAS.
All but the last read each code byte once and make no copy of the weight. The tinygemm copy costs
another half byte a weight: it is kept for a model on CUDA where `quantization.int4_tinygemm` asks
(QuantResolver.build), is in `storage` (so the planner counts it), and is derived (a sharded
checkpoint leaves it out; `rebuild` remakes it). On an H200 (BENCHMARKS.md, 2026-12-01, issue 17, 8B
shapes, µs a layer's four linears): the MMA GEMV 54.8 / 69.8 / 97.7 at 1 / 4 / 8 rows, against the
Triton GEMV's 65.0 at one row, tinygemm's 68.2 / 96.3 / 156.6 and quant_matmul's 123.3 / 122.8 at 4 / 8
(batch-1 decode through the engine: 406.2 tok/s, 1.69x bf16; 352.3 with the Triton GEMV; 419.6 against
404.8 with qkv and o on kernels/int4_tma_gemv.py, session 13); tinygemm
at 16 rows is 2-3x slower than quant_matmul, hence its threshold; w4a16_matmul at 256 rows runs at 0.5-0.6x
bf16 cuBLAS, ahead of the unpack + cuBLAS up to about 1,000 rows, behind it from there
(DEQUANT_ROWS; 256 requests through the engine: 0.83x bf16 in session 9, 0.78x with w4a16 for the
prefill chunks too).
"""
from __future__ import annotations

from math import gcd
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import kernels
from framework.config.errors import ConfigError
from framework.layers.quantization.base import LoadTimeQuant, Spec
from kernels import int4_mma_gemv as mg, int4_tinygemm as tg, int4_tma_gemv as tma, quant_gemv as qg
from kernels import quant_matmul as qmm
from kernels import w4a16_matmul as w4

QMAX = 7
# Rows (tokens) from 2 up to which a call with bf16 activations on CUDA runs tinygemm where the layer
# has its copy (H200, 2026-12-01, kernels/bench_int4.py, µs a call, qkv / o / gate_up / down: 4 rows
# 15.2 / 8.9 / 46.8 / 25.1 against quant_matmul's 15.7 / 13.4 / 47.5 / 27.5; 16 rows 35.4 / 21.7 /
# 134.8 / 67.8 against 15.6 / 13.0 / 45.0 / 26.7). At one row the GEMV wins: 9.9 / 7.2 / 28.3 / 19.7
# (session 8) against tinygemm's 9.6 / 6.8 / 33.0 / 18.6.
TINYGEMM_MAX_ROWS = 4
# From this many rows (prefill chunks) the weight is unpacked to the model dtype in one pass
# (kernels/quant_matmul.dequantize_int4, 1.9-2.3 TB/s) and multiplied by cuBLAS: the copy's 2.5 bytes
# a weight cost less than w4a16_matmul loses to cuBLAS. H200, 2026-12-01 (BENCHMARKS.md, session 9),
# µs a layer's four linears, w4a16 / unpack + cuBLAS / bf16 cuBLAS: 1,024 rows 912 / 927 / 677, 2,048
# 1,792 / 1,598 / 1,340, 8,192 7,213 / 5,573 / 5,294 (at 512 rows w4a16 wins, 593 / 603 / 349); the
# 256-request benchmark (prefill chunks of ~8k tokens) 9,327 -> 9,976 tok/s.
DEQUANT_ROWS = 1024


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


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                tinygemm: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """x @ dequantized(codes, scale).T + bias, dispatched by rows as the module docstring says;
    `tinygemm` = (packed, scale_zeros), the layer's copy in tinygemm's layout, where it has one.
    Without a Triton path the torch reference unpacks the whole weight, then one matmul."""
    if not (kernels.use_triton(x) and qmm.supported(codes, scale)):
        return F.linear(x, dequantize_int4(codes, scale, x.dtype), bias)
    x2 = x.reshape(-1, x.shape[-1])
    rows, group = x2.shape[0], x2.shape[1] // scale.shape[1]
    if tinygemm is not None and 1 < rows <= TINYGEMM_MAX_ROWS and x.is_cuda and x.dtype == torch.bfloat16:
        y = tg.int4pack_mm(x2, *tinygemm, group)
    elif rows == 1 and tma.takes(x2, codes, scale):
        y = tma.int4_tma_gemv(x2, codes, scale)
    elif rows <= mg.MAX_ROWS and mg.supported(x2, codes, scale):
        y = mg.int4_mma_gemv(x2, codes, scale)
    elif rows <= qg.DISPATCH_MAX_ROWS:
        y = qg.int4_gemv(x2, codes, scale)
    elif rows <= qmm.SMALL_M:
        y = qmm.quant_matmul(x2, codes, scale)
    elif rows < DEQUANT_ROWS and (tile := w4.tile_for(group)) is not None:
        y = w4.w4a16_matmul(x2, codes, scale, tile)
    else:
        return F.linear(x, qmm.dequantize_int4(codes, scale, x.dtype), bias)
    y = y.view(*x.shape[:-1], codes.shape[0])
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
    derived = ("weight_int4pack", "weight_scale_zeros")  # the tinygemm copy, where a layer has one

    def __init__(self, group_size: Optional[int], hf_config: Any = None, tp_size: int = 1, tinygemm: bool = False):
        self.group_size = group_size  # None: one group per row (per-channel)
        # keep a copy in tinygemm's layout for decode-sized calls (QuantResolver.build: on CUDA,
        # where quantization.int4_tinygemm asks); each layer also needs bf16 and shapes it takes
        self.tinygemm = tinygemm
        text = getattr(hf_config, "text_config", None) or hf_config
        if group_size and getattr(text, "hidden_size", None) and getattr(text, "num_attention_heads", None):
            # every size at once, in one message (storage() checks each layer again as it is built)
            check_group_size(group_size, decoder_in_features(text, tp_size))

    def storage(self, out_features: int, in_features: int) -> Spec:
        group = self.group_size or in_features
        check_group_size(group, [in_features])  # also catches layers config.json did not describe
        spec = {self.codes_name: ((out_features, in_features // 2), torch.uint8),
                "weight_scale": ((out_features, in_features // group), torch.get_default_dtype())}
        if self.tinygemm and tg.supported(out_features, in_features, group, torch.get_default_dtype()):
            spec["weight_int4pack"] = (tg.packed_shape(out_features, in_features), torch.int32)
            spec["weight_scale_zeros"] = ((in_features // group, out_features, 2), torch.bfloat16)
        return spec

    def quantize(self, layer, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        codes, scale = quantize_int4(w, self.group_size or w.shape[1], layer.weight_scale.dtype)
        return {self.codes_name: codes, "weight_scale": scale}

    def store(self, layer, offset: int, w: torch.Tensor) -> None:
        """Codes and scales for rows [offset, offset + n), then their tinygemm copy."""
        super().store(layer, offset, w)
        self.repack(layer, offset, w.shape[0])

    def rebuild(self, layer) -> None:
        self.repack(layer, 0, layer.weight_scale.shape[0])

    def repack(self, layer, offset: int, rows: int) -> None:
        """The tinygemm copy of rows [offset, offset + rows), on CUDA (tinygemm's CPU layout
        differs: there the copy is never made). It packs eight rows together, so the block is
        widened to whole eights: a shard ending mid-eight repacks it again with its neighbour's
        rows once those are loaded, and the last one loaded leaves it right."""
        if not (hasattr(layer, "weight_int4pack") and tg.can_pack(layer.weight_int4pack)):
            return
        start, end = offset // 8 * 8, -(-(offset + rows) // 8) * 8  # N is a multiple of 8 (storage)
        codes = getattr(layer, self.codes_name)[start:end]
        layer.weight_int4pack[start // 8:end // 8].copy_(tg.pack(codes))
        layer.weight_scale_zeros[:, start:end].copy_(tg.scale_zeros(layer.weight_scale[start:end]))

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        tinygemm = (layer.weight_int4pack, layer.weight_scale_zeros) if hasattr(layer, "weight_int4pack") else None
        return int4_linear(x, getattr(layer, self.codes_name), layer.weight_scale, bias, tinygemm)

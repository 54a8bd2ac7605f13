"""int4 through PyTorch's tinygemm kernels (`aten._weight_int4pack_mm`, CUDA sm80+, bf16).

tinygemm is the int4 GEMV/GEMM gpt-fast uses: its weights are pre-shuffled into the register
layout of the m16n8k16 tensor-core instruction, so a warp loads its operand fragments with
16-byte loads and no shuffles. A library kernel here plays the part cuBLAS plays for bf16.

Formats (torch's, CUDA): `packed` int32 [N/8, K/(16 * inner), 32, inner/2] from
`aten._convert_weight_to_int4pack(uint8 [N, K/2], inner)`, whose bytes hold column 2j in the
*high* nibble and 2j + 1 in the low one (ours, framework/layers/quantization/int4.py, hold 2j
in the low nibble: `pack` swaps them), each as q + 8; `scale_zeros` bf16 [K/G, N, 2] with
W = (code - 8) * scale + zero, so our symmetric codes take zero = 0. Eight output rows pack
together, so any block of rows that starts and ends on a multiple of 8 packs on its own
(the loader quantizes one shard of rows at a time).
"""
from __future__ import annotations

from typing import Tuple

import torch

INNER_K_TILES = 8  # 16-byte loads of codes per lane (2 and 4 are 4- and 8-byte)
GROUPS = (32, 64, 128, 256)  # the group sizes tinygemm is compiled for


def supported(n: int, k: int, group: int, dtype: torch.dtype, inner: int = INNER_K_TILES) -> bool:
    """Whether an [n, k] int4 weight of this group size and activation dtype can run here."""
    return (dtype == torch.bfloat16 and group in GROUPS and n % 8 == 0 and k % (16 * inner) == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm"))


def packed_shape(n: int, k: int, inner: int = INNER_K_TILES) -> Tuple[int, int, int, int]:
    return (n // 8, k // (16 * inner), 32, inner // 2)


def can_pack(t: torch.Tensor) -> bool:
    """`pack` runs where `t` is (the CPU's int4pack layout is another one)."""
    return t.is_cuda


def pack(codes: torch.Tensor, inner: int = INNER_K_TILES) -> torch.Tensor:
    """Our uint8 codes [N, K/2] (CUDA) -> tinygemm's int32 layout."""
    swapped = ((codes & 0xF) << 4) | (codes >> 4)
    return torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner)


def scale_zeros(scale: torch.Tensor) -> torch.Tensor:
    """Our scales [N, K/G] -> tinygemm's [K/G, N, 2] (scale, zero = 0) in bf16."""
    return torch.stack((scale, torch.zeros_like(scale)), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] bf16 times the packed int4 weight [N, K] transposed -> [M, N] bf16."""
    return torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, group, scale_zeros)

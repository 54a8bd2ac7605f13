"""Where each int4 code sits in the packed weight: the layout the kernels read.

The weight is uint8 [N, K/2], read by the kernels as little-endian int32 words of eight codes.
Columns are cut into blocks of B = gcd(K, 128) columns (B/8 words). In the natural order
(compressed-tensors, GPTQ) word j of a block holds columns 8j..8j+7, nibble i (bits 4i..4i+3)
column 8j+i. Here word j's nibble i holds column i * B/8 + j instead: the block is stored as the
transpose of its natural [B/8, 8] code grid. Each code is stored as q + 8 (zero is code 8).

Why: a GEMV thread that holds a word extracts nibble i with one shift and one mask, and the
eight nibbles of a tile of words then meet eight *contiguous* runs of x (columns i*B/8 + j for
j = 0..B/8-1), which load as plain vectors. In the natural order each word meets eight adjacent
columns, so unpacking either interleaves the nibbles back into column order (a register shuffle
per code: what held the previous GEMV at 39% of its roofline) or reads x at stride 8.

With K % 8 != 0 (B < 8) there are no words and the layout is the natural one; the kernels need
the group size to be a multiple of 16 (so K too) and never see it. Repacking happens once, at
load (framework/layers/quantization/int4.py), and costs no memory: it is a permutation of bytes.
"""

from __future__ import annotations

import math

import torch

MAX_BLOCK = 128  # columns of a block at most: one group of the usual group size 128


def block_columns(k: int) -> int:
    """B, the columns of a block, for input width k (1, 2 or 4 mean the natural order)."""
    return math.gcd(k, MAX_BLOCK)


def _grid(q: torch.Tensor, transpose_from: tuple[int, int]) -> torch.Tensor:
    n, k = q.shape
    b = block_columns(k)
    if b < 8:
        return q
    a, c = transpose_from
    return q.reshape(n, k // b, a, c).transpose(2, 3).reshape(n, k)


def to_storage_order(q: torch.Tensor) -> torch.Tensor:
    """[n, k] codes in column order -> [n, k] in the order nibbles are packed (position 8j + i of a
    block holds column i * B/8 + j)."""
    b = block_columns(q.shape[1])
    return _grid(q, (8, b // 8))


def to_column_order(p: torch.Tensor) -> torch.Tensor:
    """The inverse of to_storage_order."""
    b = block_columns(p.shape[1])
    return _grid(p, (b // 8, 8))


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], [n, k] in storage order -> bytes [n, k/2] (position 2j in the low nibble
    of byte j, 2j+1 in the high one: little-endian words then hold position 8w + i in bits 4i..)."""
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """bytes [n, k/2] -> uint8 values in [0, 15], [n, k] in storage order."""
    return torch.stack((codes & 0xF, codes >> 4), dim=-1).view(codes.shape[0], -1)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7], [n, k] in column order (k even) -> the stored bytes [n, k/2]."""
    return pack_nibbles(to_storage_order((q.to(torch.int16) + 8).to(torch.uint8)))


def unpack(codes: torch.Tensor) -> torch.Tensor:
    """The stored bytes [n, k/2] -> int8 codes in [-8, 7], [n, k] in column order."""
    return to_column_order(unpack_nibbles(codes)).to(torch.int8) - 8


def from_natural(codes: torch.Tensor) -> torch.Tensor:
    """Bytes packed in the natural order (byte j: columns 2j, 2j+1; compressed-tensors' int32 words
    viewed as bytes) -> the stored layout."""
    return pack_nibbles(to_storage_order(unpack_nibbles(codes)))

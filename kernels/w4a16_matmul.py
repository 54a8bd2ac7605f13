"""y = x @ W.T for many rows of x with W in int4 (W4A16): the prefill and large decode batches.

Format as in kernels/quant_matmul.py: codes uint8 [N, K/2] (column 2j in the low nibble of byte
j, 2j + 1 in the high one, each q + 8), scale [N, K/G] in the activation dtype, W[n, k] =
(code - 8) * scale[n, k // G] rounded to the activation dtype.

Why not dequantize + cuBLAS: writing a bf16 copy of the weight then reading it back costs 2.5 bytes
a weight on top of the matmul, which at decode batches (65 to a few hundred rows) is a large share:
on an H200 at 256 rows this kernel took 343 µs a layer, the unpack alone 264 and cuBLAS 209. From
about 1,000 rows the matmul's own time dwarfs the copy and cuBLAS's speed wins: there int4_linear
unpacks (layers/quantization/int4.py, DEQUANT_ROWS). Here a program owns a [BLOCK_N weight rows,
BLOCK_M x rows] output tile, walks K in BLOCK_K steps, loads the tile's code bytes once,
turns each nibble into code - 8 in registers (an OR into a float's mantissa and a subtract, no
int-to-float conversion), joins the two nibbles of a byte back into column order (thread-local:
a byte's two columns stay with the thread that loaded it; `split_x` instead splits x's tile into
its even and odd columns for two dots, as quant_matmul does), multiplies by the group scale
(BLOCK_K divides G: one scale per weight row and step) and feeds `tl.dot`. x tiles load
contiguously, so Triton's pipeliner stages them in shared memory ahead of use.

W_FIRST computes the tile transposed (acc[n, m] = W[n, :] . x[m, :]): Hopper's wgmma reads its
first operand from registers, where the weight was just dequantized, and only x goes through
shared memory; otherwise the dequantized weight is written to shared memory as the second
operand. Programs are ordered in groups of GROUP_M row tiles, so the weight tiles a wave reads
are re-read from L2 by its neighbours. Where the output has too few tiles to fill the card, the
K loop is split over programs (split_for; float32 partial sums, added in a fixed order after).

The reference is kernels.quant_matmul.quant_matmul_ref.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton import grouped_tile, num_sms, pdl, pdl_enter, tl, triton
from kernels.quant_matmul import _code_minus_8


@dataclass(frozen=True)
class Tile:
    block_m: int  # x rows a program computes
    block_n: int  # weight rows (output columns) a program computes
    block_k: int  # columns a K step covers; must divide the group size
    w_first: bool  # transposed product: the dequantized weight is the dot's first operand
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_x: bool = False  # two dots on x's even / odd columns instead of joining the nibbles
    split: int = 0  # programs the K loop is split over; 0: split_for's choice


DEFAULT_TILE = Tile(128, 128, 64, True, 8, 3)
# Chosen on an H200 (2026-12-01, kernels/bench_int4.py, bf16, 8B shapes, µs a call at 256 rows):
# 128x128x128 was best on qkv / o / down (43.4 / 43.4 / 145.5 unsplit), 256x128x64 on gate_up (154.8
# against 169.9). Both transposed, 8 warps. int4_linear sends this kernel 65 to DEQUANT_ROWS - 1 rows.
MID_TILE = Tile(128, 128, 128, True, 8, 3)
GROUP64_TILE = Tile(256, 128, 64, True, 8, 3)  # K steps of 64, for group sizes that 128 does not divide


def tile_for(group: int) -> Tile | None:
    """The tile for the group size, or None where it fits no tile."""
    if group % MID_TILE.block_k == 0:
        return MID_TILE
    return GROUP64_TILE if group % GROUP64_TILE.block_k == 0 else None


@triton.jit
def _mma(w, x, acc, W_FIRST: tl.constexpr, IEEE: tl.constexpr):
    """acc += w @ x.T (W_FIRST, acc [n, m]) or x @ w.T (acc [m, n]); float32 inputs exactly."""
    if W_FIRST:
        if IEEE:
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    else:
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


# M, the step's rows, is not specialized on: M = 1,100 would compile another variant than the
# warm-up's 2,048 (16-divisible) inside a run
@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(
    x_ptr, codes_ptr, scale_ptr, y_ptr,
    M, N, K, k_per_split, stride_xm, stride_cn, stride_sn, stride_ys, stride_ym,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, W_FIRST: tl.constexpr, SPLIT_X: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # loads wrap past the edge (rows % M) instead of masking, so they stay unmasked vector loads;
    # the wrapped rows and columns are never stored
    rows_in, cols_in = (rows % M).to(tl.int64), (cols % N).to(tl.int64)
    code_ptrs = codes_ptr + cols_in[:, None] * stride_cn + tl.arange(0, BLOCK_K // 2)[None, :]
    scale_ptrs = scale_ptr + cols_in * stride_sn
    x_ptrs = x_ptr + rows_in[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    dtype = x_ptr.dtype.element_ty
    if W_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = tl.program_id(1) * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        byte = tl.load(code_ptrs + k0 // 2)
        s = tl.load(scale_ptrs + k0 // GROUP).to(dtype)
        x = tl.load(x_ptrs + k0)
        low = _code_minus_8(byte & 0xF, dtype) * s[:, None]  # rounded as the reference rounds W
        high = _code_minus_8(byte >> 4, dtype) * s[:, None]
        if SPLIT_X:  # x's even and odd columns meet the low and high nibbles: two dots of BLOCK_K / 2
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            acc = _mma(low, x_even, acc, W_FIRST, IEEE)
            acc = _mma(high, x_odd, acc, W_FIRST, IEEE)
        else:  # the nibbles joined back into column order: one dot
            acc = _mma(tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K)), x, acc, W_FIRST, IEEE)
    y_ptr += tl.program_id(1) * stride_ys
    if W_FIRST:
        out = y_ptr + rows.to(tl.int64)[None, :] * stride_ym + cols[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(cols < N)[:, None] & (rows < M)[None, :])
    else:
        out = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def split_for(tiles: int, k: int, block_k: int, sms: int) -> int:
    """Programs to split the K loop over (1, 2, 4 or 8; whole K steps each): the largest split
    whose programs still run in one wave (tiles * split <= SMs). A second wave costs as much as
    the split saves, and the partial sums cost on top: on an H200 at 256 rows (2026-12-01,
    kernels/bench_int4.py, 128 x 128 tiles) qkv's 96 output tiles ran 43.4 µs unsplit and 58.9
    split 2 ways; the o and down projections' 64 tiles ran 43.4 -> 38.6 and 145.5 -> 95.0 split
    4 ways (two waves). This rule splits those 2 ways (one wave): 34.1 and 90.2 µs (H200, session 9)."""
    split = 1
    while split < 8 and tiles * split * 2 <= sms and k % (split * 2 * block_k) == 0:
        split *= 2
    return split


def supported(codes: torch.Tensor, scale: torch.Tensor, block_k: int = DEFAULT_TILE.block_k) -> bool:
    """The group size must be a multiple of the tile's K step."""
    k = codes.shape[1] * 2
    return k % scale.shape[1] == 0 and (k // scale.shape[1]) % block_k == 0


def w4a16_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, tile: Tile = DEFAULT_TILE
                 ) -> torch.Tensor:
    """Triton: x [M, K] times the int4 weight [N, K] transposed -> [M, N] in x.dtype."""
    m, k = x.shape
    n = codes.shape[0]
    assert codes.dtype == torch.uint8 and codes.shape[1] * 2 == k, "codes must be uint8 [N, K/2]"
    assert supported(codes, scale, tile.block_k), f"the group size must be a multiple of {tile.block_k}"
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes, scale = codes.contiguous(), scale.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    tiles = triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n)
    split = tile.split or split_for(tiles, k, tile.block_k, num_sms(x.device, off_gpu=4))
    assert k % (split * tile.block_k) == 0, "a split must hold whole K steps"
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _w4a16_kernel[(tiles, split)](
        x, codes, scale, out, m, n, k, k // split, x.stride(0), codes.stride(0), scale.stride(0),
        out.stride(0) if split > 1 else 0, out.stride(-2),
        GROUP=k // scale.shape[1], BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m, W_FIRST=tile.w_first, SPLIT_X=tile.split_x, IEEE=x.dtype == torch.float32,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl(x.device)
    )
    return y if split == 1 else out.sum(0).to(x.dtype)

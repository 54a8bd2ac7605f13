"""y = x @ W.T for a few rows of x with W stored quantized: the decode step's quantized linears.

Formats as in kernels/quant_matmul.py: int4 codes uint8 [N, K/2] (column 2j in the low nibble of
byte j, 2j+1 in the high one, each q + 8) with a scale [N, K/G] in the activation dtype;
int8 / float8_e4m3fn codes [N, K] with a float32 scale [N] per output row.

Why not `quant_matmul`: with one row, `tl.dot` pads x to 16 rows (16x the tensor-core work for
nothing) and its per-column unpack reads each int4 byte twice. Decode time should be the weight
bytes, so here each program owns BLOCK_N output columns (weight rows), walks K in tiles, reads
every code byte once and multiplies it by every row of x (up to GEMV_MAX_ROWS, the row loop is
unrolled) before the next tile: the weight is read once per call. The layers send it one row
only (DISPATCH_MAX_ROWS): at eight rows, repeating the unpack per row made it 3-7x slower than
quant_matmul on an H100. Products are elementwise
multiply + `tl.sum` in float32, not `tl.dot` (nothing for tensor cores to do with 1-8 rows, and
Triton's CPU interpreter computes bf16 `tl.dot` wrongly).

int4 groups: a K tile is [SUB, SPAN] columns, where SPAN is the largest power of two dividing
the group size G (capped at the tile), so a span never straddles a group and needs one scale.
The span's codes times x are summed first, then multiplied by that scale: one multiply per span,
not per weight. With G = 128 and the default tile, a tile holds 8 whole groups.

int8 / fp8: the row scale multiplies the finished dot product, once per output.

The references are kernels.quant_matmul.quant_matmul_ref (dequantize, then one matmul).
The results here are W's exact products accumulated in float32: the references round W to x's dtype
first, so bf16 results differ from them by that rounding.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, tl, triton
from kernels.int4_layout import block_columns

GEMV_MAX_ROWS = 8  # the kernels' limit: their row loop is unrolled
# Rows the dispatch (int4_linear, scaled_linear) sends here; more go to quant_matmul (tensor cores)
# up to its SMALL_M, then dequantize + cuBLAS. On an H100 (bf16 activations, 8B shapes, in CUDA
# graphs, 2026-11-25) the GEMVs beat quant_matmul at one row (int4: 8.9-40 µs vs 13.4-43.9) and
# lost 3-7x at eight (int4 gate_up 207 µs vs 47), where every row repeats the unpacking.
DISPATCH_MAX_ROWS = 1

# Tiles of 4 KiB of codes per program and K step. int4: 8 weight rows x 512 bytes (1024 columns,
# 8 groups of 128); int8/fp8: 4 rows x 1024 bytes. Both give each of 4 warps' 128 threads two
# 16-byte loads per step, and N/8 or N/4 programs (512+ for N = 4096) fill every SM several
# times over. Not yet tuned on a GPU: kernels/bench.py times alternatives (pending).
INT4_BLOCK_N, INT4_BLOCK_K = 8, 1024
ROWSCALED_BLOCK_N, ROWSCALED_BLOCK_K = 4, 1024
NUM_WARPS = 4

MAGIC = tl.constexpr(0x4B000000)  # the float32 bit pattern of 2^23
MAGIC_F = tl.constexpr(8388608.0)  # 2^23


@triton.jit
def _as_float(u, offset: tl.constexpr):
    """u - offset in float32, exactly, for int32 u in [0, 2^23). OR-ing u into the mantissa of
    2^23 and subtracting 2^23 replaces an int-to-float conversion with an OR and an add: Hopper
    converts 16 a clock per SM (about 4 T/s on an H100), below the 6.7 T int4 weights/s that its
    bandwidth delivers, and adds at 128. The offset (the code's zero point) rides on the add."""
    return (u | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + offset)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, words_ptr, scale_ptr, y_ptr,
    N, K, k_per_split, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, WPB: tl.constexpr,
):
    # One row of x a program (program_id(2)). A tile is [BLOCK_N weight rows, WORDS int32 words];
    # word w of a step lies in layout block w // WPB, and its nibble i holds column
    # (w // WPB) * PB + i * WPB + w % WPB (kernels/int4_layout.py): slot i of all the words meets
    # one vector of x, contiguous within each block. Plain 2-D tiles, as in the fp8 GEMV below:
    # the x vectors broadcast over the weight rows without layout conversions.
    PB: tl.constexpr = 8 * WPB
    pid_n, pid_s, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    word = tl.arange(0, WORDS)
    xcol = (word // WPB) * PB + word % WPB  # column of slot 0 of each word, from the step's start
    word_ptrs = words_ptr + cols.to(tl.int64)[:, None] * stride_wn + word[None, :]
    x_row = x_ptr + m * stride_xm
    scale_rows = scale_ptr + cols.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # a running sum per word, reduced at the end
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, 8 * WORDS):
        ok = k0 + xcol < K  # whole blocks: PB divides K
        # masked words are 0 (every code reads as 0 - 8) and meet x = 0
        wt = tl.load(word_ptrs + k0 // 8, mask=col_ok[:, None] & ok[None, :], other=0,
                     eviction_policy="evict_first")
        part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        corr = tl.zeros((WORDS,), dtype=tl.float32)
        for i in tl.static_range(8):
            # Nibble i (bits 4i..4i+3) is moved to mantissa bit 15 (even i) or 19 (odd i) of the
            # float 256 (or 16): one shift serves two nibbles, and the mask and the OR are one
            # LOP3. The float is w = 256 + c (16 + c) for the code c in [0, 15], so w * x is
            # 256 x + c x, and `corr` (the 256 x terms and the zero point 8 x, shared by every
            # weight row) is subtracted once per group. No int-to-float conversion, no offset
            # subtraction: a shift (per two codes), a LOP3 and an FMA per code. The bias 256 x
            # costs precision: the running sums carry about 2^-16 of |x| of rounding a product.
            if i // 2 == 0:
                sh = wt << 15
            elif i // 2 == 1:
                sh = wt << 7
            elif i // 2 == 2:
                sh = wt >> 1
            else:
                sh = wt >> 9
            if i % 2 == 0:
                w = ((sh & 0x78000) | 0x43800000).to(tl.float32, bitcast=True)  # 256 + c
                bias = 264.0  # 256 + the zero point 8
            else:
                w = ((sh & 0x780000) | 0x41800000).to(tl.float32, bitcast=True)  # 16 + c
                bias = 24.0
            x = tl.load(x_row + k0 + xcol + i * WPB, mask=ok, other=0.0).to(tl.float32)
            part += w * x[None, :]
            corr += x * bias
            # one scale a block when G is a multiple of the block (G = 128: every case that
            # matters); else a scale per slot (WPB divides G, so a slot lies in one group)
            if GROUP % PB != 0 or i == 7:
                if GROUP % PB == 0:
                    g = (k0 + xcol) // GROUP
                else:
                    g = (k0 + xcol + i * WPB) // GROUP
                s = tl.load(scale_rows + g[None, :], mask=col_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
                acc += (part - corr[None, :]) * s
                part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                corr = tl.zeros((WORDS,), dtype=tl.float32)
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + pid_s * stride_ys + m * stride_ym + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _rowscaled_gemv_kernel(
    x_ptr, codes_ptr, scale_ptr, y_ptr,
    N, K, stride_xm, stride_cn,
    IS_FP8: tl.constexpr, ROWS: tl.constexpr, ROWS_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    code_rows = codes_ptr + cols.to(tl.int64)[:, None] * stride_cn
    rows = tl.arange(0, ROWS_P2)
    acc = tl.zeros((BLOCK_N, ROWS_P2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        # no `other`: there is no fp8 literal zero. Masked int8 lanes are finite and meet x = 0;
        # masked fp8 lanes may hold NaN bit patterns, so they are zeroed after the conversion.
        c = tl.load(code_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :])
        if IS_FP8:
            w = tl.where(k_ok[None, :], c.to(tl.float32), 0.0)
        else:  # int8 codes arrive as their bytes (uint8): byte ^ 0x80 is code + 128, in [0, 255]
            w = _as_float(c.to(tl.int32) ^ 0x80, 128.0)
        for m in tl.static_range(ROWS):
            x = tl.load(x_ptr + m * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1)
            acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
    acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[:, None]
    out = y_ptr + rows[None, :] * N + cols[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & (rows < ROWS)[None, :])


def _check_rows(x: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS, f"x must be [M, K] with M <= {GEMV_MAX_ROWS}"
    return x if x.stride(1) == 1 else x.contiguous()


def int4_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              block_n: int = INT4_BLOCK_N, block_k: int = INT4_BLOCK_K, split: int = 1,
              num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Triton: x [M, K] (M <= GEMV_MAX_ROWS) times the int4 weight [N, K] transposed -> [M, N] in
    x.dtype; codes in the layout of kernels/int4_layout.py. The group size G = K / scale.shape[1]
    must be a multiple of 16 (so K too). `block_n` / `block_k` (columns a step; a power of two,
    rounded up to one layout block) / `split` (programs the K loop is cut into; partial sums are
    added in a fixed order) / `num_warps` (tests, bench) override the defaults."""
    x = _check_rows(x)
    m, k = x.shape
    n = codes.shape[0]
    assert codes.dtype == torch.uint8 and codes.shape[1] * 2 == k, "codes must be uint8 [N, K/2]"
    group = k // scale.shape[1]
    assert scale.shape[0] == n and group * scale.shape[1] == k and group % 16 == 0, "group size must be a multiple of 16"
    codes, scale = codes.contiguous(), scale.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    pb = block_columns(k)  # >= 16, as 16 divides G and so K
    words = max(1, min(block_k, next_pow2(k)) // pb) * pb // 8  # whole layout blocks a step
    step = 8 * words
    k_per_split = triton.cdiv(triton.cdiv(k, split), step) * step
    split = triton.cdiv(k, k_per_split)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _int4_gemv_kernel[(triton.cdiv(n, block_n), split, m)](
        x, codes.view(torch.int32), scale, out, n, k, k_per_split, x.stride(0), codes.stride(0) // 4,
        scale.stride(0), out.stride(0) if split > 1 else 0, out.stride(-2),
        GROUP=group, BLOCK_N=block_n, WORDS=words, WPB=pb // 8, num_warps=num_warps,
    )
    return y if split == 1 else out.sum(0).to(x.dtype)


def rowscaled_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   block_n: int = ROWSCALED_BLOCK_N, block_k: int = ROWSCALED_BLOCK_K) -> torch.Tensor:
    """Triton: x [M, K] (M <= GEMV_MAX_ROWS) times codes [N, K] (int8 or float8_e4m3fn)
    transposed, times the float32 row scale [N] -> [M, N] in x.dtype."""
    x = _check_rows(x)
    m, k = x.shape
    n = codes.shape[0]
    assert codes.shape == (n, k) and scale.shape == (n,), "codes must be [N, K] and scale [N]"
    is_fp8 = codes.dtype == torch.float8_e4m3fn
    assert is_fp8 or codes.dtype == torch.int8, "codes must be int8 or float8_e4m3fn"
    codes, scale = codes.contiguous(), scale.contiguous().float()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    _rowscaled_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, codes if is_fp8 else codes.view(torch.uint8), scale, y, n, k, x.stride(0), codes.stride(0),
        IS_FP8=is_fp8, ROWS=m, ROWS_P2=next_pow2(m), BLOCK_N=block_n, BLOCK_K=min(block_k, next_pow2(k)),
        num_warps=NUM_WARPS,
    )
    return y

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

int4 (`_int4_gemv_kernel`): the codes are read as int32 words, 8 columns each, and every nibble
becomes 1 + q/16 in float32 by a shift and one LOP3 into the mantissa of 1.0; the dot product
follows from sum (q - 8) x = 16 sum f x - 24 sum x. The decode GEMV is bound by instructions, not
bytes: an H200 SM issues 128 thread-instructions a clock while the copy rate brings it about 35
codes, so at most 3.6 instructions a code keep up. Here 4.4 (sm_90 SASS); splitting bytes into
nibbles and converting them took 8. A K step covers spans of the largest power of two dividing
G / 8 words, so a span never straddles a group and needs one scale, applied to the span's sum.

int8 / fp8: the row scale multiplies the finished dot product, once per output.

The references are kernels.quant_matmul.quant_matmul_ref (dequantize, then one matmul).
The results here are W's exact products accumulated in float32: the references round W to x's dtype
first, so bf16 results differ from them by that rounding.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton

GEMV_MAX_ROWS = 8  # the kernels' limit: their row loop is unrolled
# Rows the dispatch (int4_linear, scaled_linear) sends here; more go to quant_matmul (tensor cores)
# up to its SMALL_M, then dequantize + cuBLAS. On an H100 (bf16 activations, 8B shapes, in CUDA
# graphs, 2026-11-25) the GEMVs beat quant_matmul at one row (int4: 8.9-40 µs vs 13.4-43.9) and
# lost 3-7x at eight (int4 gate_up 207 µs vs 47), where every row repeats the unpacking. int4 on
# CUDA in bf16 / fp16 with group sizes of 128 multiples takes kernels/int4_mma_gemv.py first (1-8 rows).
DISPATCH_MAX_ROWS = 1

# int4: 16 weight rows x 2,048 columns (1 KiB of codes a row, 16 groups of 128) a program and K
# step. On an H200 (2026-12-01, BENCHMARKS.md session 8, one call, bf16 x, µs a call for qkv / o /
# gate_up / down) 9.9 / 7.2 / 28.3 / 19.7, 65.2 a layer, against 82.2 for the byte-unpacking kernel
# it replaced (10.5 / 7.9 / 39.8 / 24.0 at its best tile, 4 x 2048); the best of six tiles per shape
# would give 62.4.
INT4_BLOCK_N, INT4_BLOCK_K = 16, 2048
# int8/fp8: 4 weight rows x 2 KiB. fp8 on an H200 (kernels/bench_quant.py --gemv, 4x2048 / 8x2048):
# qkv (N = 6144) 8.7 / 10.8, o 6.2 / 6.4, gate_up (N = 28672) 30.0 / 30.0, down (K = 14336) 17.0 /
# 17.1 µs; through the engine 4x2048 was the best of seven tiles at batch 1 (370.2 tok/s).
ROWSCALED_BLOCK_N, ROWSCALED_BLOCK_K = 4, 2048
NUM_WARPS = 4

MAGIC = tl.constexpr(0x4B000000)  # the float32 bit pattern of 2^23
MAGIC_F = tl.constexpr(8388608.0)  # 2^23


@triton.jit
def _as_float(u, offset: tl.constexpr):
    """u - offset in float32, exactly, for int32 u in [0, 2^23) (int8 codes + 128). OR-ing u into
    the mantissa of 2^23 and subtracting 2^23 replaces an int-to-float conversion with an OR and an
    add: Hopper converts 16 a clock per SM and adds at 128. The offset (the zero point) rides on
    the add."""
    return (u | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + offset)


@triton.jit
def _nibble(words, T: tl.constexpr, MASK, ONE):
    """1 + q/16 in float32, exactly, for q the T-th nibble (bits 4T..4T+3) of each int32 word: the
    nibble shifted to mantissa bits 19-22 of 1.0. MASK (0x00780000) and ONE (0x3F800000) arrive
    as kernel arguments, not literals: in registers, the AND and OR are one LOP3 (with two
    immediates ptxas emits two)."""
    if 4 * T <= 19:
        moved = words << (19 - 4 * T)
    else:
        moved = words >> (4 * T - 19)
    return ((moved & MASK) | ONE).to(tl.float32, bitcast=True)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, words_ptr, scale_ptr, y_ptr,
    N, K, stride_xm, stride_wn, stride_sn, MASK, ONE,
    GROUP: tl.constexpr, ROWS: tl.constexpr, ROWS_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, SUBS: tl.constexpr, SPAN_W: tl.constexpr, PDL: tl.constexpr,
):
    # A K step is [BLOCK_N, SUBS * SPAN_W] words of the codes viewed as int32 [N, K/8] (nibble t of
    # word j is column 8j + t): per code a shift, a LOP3 and an FMA (the module docstring).
    pdl_enter(PDL)
    W: tl.constexpr = SUBS * SPAN_W
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    j = tl.arange(0, W)
    word_ptrs = words_ptr + cols.to(tl.int64)[:, None] * stride_wn + j[None, :]
    span = tl.arange(0, SUBS)
    scale_rows = scale_ptr + cols.to(tl.int64)[:, None] * stride_sn
    rows = tl.arange(0, ROWS_P2)  # Triton shapes are powers of two; rows >= ROWS are never stored
    # acc[n, m] (output column, x row): laid out like a tile's row sums, transposed at the store
    acc = tl.zeros((BLOCK_N, ROWS_P2), dtype=tl.float32)
    for k0 in range(0, K, W * 8):
        word_ok = k0 + j * 8 < K  # K is a multiple of a span (SPAN_W words)
        words = tl.load(word_ptrs + k0 // 8, mask=col_ok[:, None] & word_ok[None, :], other=0)
        # spans of SPAN_W words, the largest power of two dividing G / 8: one scale a span
        first = k0 + span * (SPAN_W * 8)
        s = tl.load(scale_rows + (first // GROUP)[None, :], mask=col_ok[:, None] & (first < K)[None, :],
                    other=0.0).to(tl.float32)
        for m in tl.static_range(ROWS):
            fx = tl.zeros((BLOCK_N, W), dtype=tl.float32)
            xsum = tl.zeros((W,), dtype=tl.float32)
            for t in tl.static_range(8):
                x = tl.load(x_ptr + m * stride_xm + k0 + j * 8 + t, mask=word_ok, other=0.0).to(tl.float32)
                fx += _nibble(words, t, MASK, ONE) * x[None, :]
                xsum += x
            fx_span = tl.sum(tl.reshape(fx, (BLOCK_N, SUBS, SPAN_W)), axis=2)
            x_span = tl.sum(tl.reshape(xsum, (SUBS, SPAN_W)), axis=1)
            part = tl.sum((16.0 * fx_span - 24.0 * x_span[None, :]) * s, axis=1)
            acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
    out = y_ptr + rows[None, :] * N + cols[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & (rows < ROWS)[None, :])


@triton.jit
def _rowscaled_gemv_kernel(
    x_ptr, codes_ptr, scale_ptr, y_ptr,
    N, K, stride_xm, stride_cn,
    IS_FP8: tl.constexpr, ROWS: tl.constexpr, ROWS_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    code_rows = codes_ptr + cols.to(tl.int64)[:, None] * stride_cn
    rows = tl.arange(0, ROWS_P2)
    acc = tl.zeros((BLOCK_N, ROWS_P2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        # The codes load as bytes (uint8), 0 past K: +0.0 in fp8, and int8 -128 after the XOR
        # below, met by x = 0 there. Converted here, not at the load: loaded as fp8, [4, 2048]
        # tiles ran 6-13% slower on an H200 (qkv / o / gate_up / down 9.3 / 7.1 / 32.0 / 18.8 µs
        # against 8.7 / 6.2 / 30.0 / 17.0; BENCHMARKS.md, session 8).
        c = tl.load(code_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        if IS_FP8:
            w = c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:  # int8: byte ^ 0x80 is code + 128, in [0, 255]
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
              block_n: int = INT4_BLOCK_N, block_k: int = INT4_BLOCK_K, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Triton: x [M, K] (M <= GEMV_MAX_ROWS) times the int4 weight [N, K] transposed -> [M, N] in
    x.dtype. K and the group size G = K / scale.shape[1] must be multiples of 8 (the dispatch asks
    for a multiple of 16). `block_n` / `block_k` (columns a step, a power of two >= 8) and
    `num_warps` (tests, bench) override the tile."""
    x = _check_rows(x)
    m, k = x.shape
    n = codes.shape[0]
    assert codes.dtype == torch.uint8 and codes.shape[1] * 2 == k, "codes must be uint8 [N, K/2]"
    group = k // scale.shape[1]
    assert scale.shape[0] == n and group * scale.shape[1] == k and group % 8 == 0, "bad group size"
    words, scale = codes.contiguous().view(torch.int32), scale.contiguous()  # 8 codes a word
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    tile_words = min(block_k, next_pow2(k)) // 8  # no wider than K: a tile past K only loads masked lanes
    span_words = min((group // 8) & -(group // 8), tile_words)  # the largest power of two dividing G / 8
    _int4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, words, scale, y, n, k, x.stride(0), words.stride(0), scale.stride(0), 0x00780000, 0x3F800000,
        GROUP=group, ROWS=m, ROWS_P2=next_pow2(m), BLOCK_N=block_n, SUBS=tile_words // span_words,
        SPAN_W=span_words, num_warps=num_warps, **pdl(x.device)
    )
    return y


def rowscaled_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   block_n: int = ROWSCALED_BLOCK_N, block_k: int = ROWSCALED_BLOCK_K,
                   num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Triton: x [M, K] (M <= GEMV_MAX_ROWS) times codes [N, K] (int8 or float8_e4m3fn)
    transposed, times the float32 row scale [N] -> [M, N] in x.dtype. `block_n`, `block_k`,
    `num_warps` (bench, the layers' per-shape tile) override the defaults."""
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
        x, codes.view(torch.uint8), scale, y, n, k, x.stride(0), codes.stride(0),
        IS_FP8=is_fp8, ROWS=m, ROWS_P2=next_pow2(m), BLOCK_N=block_n, BLOCK_K=min(block_k, next_pow2(k)),
        num_warps=num_warps, **pdl(x.device)
    )
    return y

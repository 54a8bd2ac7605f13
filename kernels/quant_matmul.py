"""y = x @ W.T with W stored quantized (weight-only: x and y stay in the activation dtype).

Formats (framework/layers/quantization defines them):
- bits=4: `codes` uint8 [N, K/2], input column 2j in the low nibble of byte j and 2j+1 in the
  high one, each holding q + 8; `scale` [N, K/G] in the activation dtype.
  W[n, k] = (code - 8) * scale[n, k // G], the product rounded to the activation dtype.
- bits=8: `codes` int8 or float8_e4m3fn [N, K]; `scale` float32 [N], one per output row.
  y = (x @ codes.T) * scale: the scale multiplies the output, the codes convert exactly.

Why kernels: decode reads every weight once per step, so its time is the weight bytes. Turning
the codes into a bf16 weight first (the references) writes and re-reads 2 bytes per weight on
every forward, which is slower than plain bf16. `quant_matmul` reads the codes once (half a
byte or one byte per weight), dequantizes a tile in registers and accumulates `tl.dot` in
float32. It is meant for few rows (decode, small chunks: SMALL_M); with many rows the matmul is
compute-bound, and `dequantize` (one pass) followed by cuBLAS wins.

int4 (`_int4_matmul_kernel`): the product is computed transposed, acc[n, m] = W[n, :] . x[m, :],
so the weight tile is the dot's first operand. Hopper's wgmma takes 64 rows per warpgroup from
that operand (int4_linear sends x 2-64 rows) and reads it from registers, where it is
dequantized; x goes through shared memory. A tile's codes are one contiguous [BLOCK_N, BLOCK_K/2] byte load
(each byte read once). Rather than interleaving the nibbles back into column order, x's tile is
split into its even and odd columns: acc += W_low @ x_even.T + W_high @ x_odd.T (two dots of
BLOCK_K/2). A nibble becomes code - 8 in the activation dtype by OR-ing it into the mantissa of
a power of two and subtracting (no int-to-float conversion), then one multiply by the group
scale rounds it exactly as the reference does. G a multiple of 32: BLOCK_K divides G, so a tile
needs one scale per weight row. G = 16 (mod 32): 32-column tiles (each dot needs K >= 16) that
may straddle groups and end past K, so scales are gathered per byte and K is masked.

int8/fp8 (`_rowscaled_matmul_kernel`): the codes convert exactly, the row scale multiplies the
output. With few output tiles the K loop is split over programs (both kernels; deterministic:
partial sums are added in a fixed order).
"""

from __future__ import annotations

import torch

from kernels._triton import num_sms, pdl, pdl_enter, tl, triton

SMALL_M = 64  # up to this many rows the fused kernel beats dequantize + cuBLAS
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 16, 256  # the tile of dequantize_int4


# Power-of-two bit patterns whose mantissa step is 1: OR-ing a nibble n into one gives 2^e + n.
_MAGIC_F32, _MAGIC_F16, _MAGIC_BF16 = tl.constexpr(0x4B000000), tl.constexpr(0x6400), tl.constexpr(0x4300)


@triton.jit
def _code_minus_8(nibble, DTYPE: tl.constexpr):
    """nibble - 8 in DTYPE, exactly: the nibble goes into the low mantissa bits of 2^23 (fp32),
    2^10 (fp16) or 2^7 (bf16), then 2^e + 8 is subtracted. An OR and an add replace an
    int-to-float conversion, which Hopper runs at 16 a clock per SM (kernels/quant_gemv.py)."""
    if DTYPE == tl.float32:
        w = (nibble.to(tl.int32) | _MAGIC_F32).to(tl.float32, bitcast=True) - 8388616.0
    elif DTYPE == tl.float16:
        w = (nibble.to(tl.int16) | _MAGIC_F16).to(tl.float16, bitcast=True) - 1032.0
    else:
        w = (nibble.to(tl.int16) | _MAGIC_BF16).to(tl.bfloat16, bitcast=True) - 136.0
    return w


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # float32 activations get exact products (the default, tf32, would round them)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# M, the step's rows, is not specialized on: M = 1,100 would compile another variant than the
# warm-up's 2,048 (16-divisible) inside a run
@triton.jit(do_not_specialize=["M"])
def _int4_matmul_kernel(
    x_ptr, codes_ptr, scale_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_cn, stride_sn, stride_os, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    pair = tl.arange(0, BLOCK_K // 2)  # byte j of a tile holds its columns 2j (low) and 2j + 1 (high)
    code_ptrs = codes_ptr + cols.to(tl.int64)[:, None] * stride_cn + pair[None, :]
    scale_ptrs = scale_ptr + cols.to(tl.int64) * stride_sn
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: [weight row, x row]
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        if GROUP % BLOCK_K == 0:  # the tile lies in one group and inside K
            byte = tl.load(code_ptrs + k0 // 2, mask=col_ok[:, None], other=0)
            s = tl.load(scale_ptrs + k0 // GROUP, mask=col_ok, other=0.0)[:, None]
            x = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
        else:  # G = 16 (mod 32): each byte's own group; the last tile may end past K
            pair_ok = col_ok[:, None] & (k0 + 2 * pair < K)[None, :]
            byte = tl.load(code_ptrs + k0 // 2, mask=pair_ok, other=0)
            s = tl.load(scale_ptrs[:, None] + ((k0 + 2 * pair) // GROUP)[None, :], mask=pair_ok, other=0.0)
            x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & (k0 + tl.arange(0, BLOCK_K) < K)[None, :], other=0.0)
        # masked bytes give -8 times a masked scale of 0: no NaN, and x is 0 there anyway
        s = s.to(dtype)
        w_low = _code_minus_8(byte & 0xF, dtype) * s  # rounded to dtype, as the reference rounds W
        w_high = _code_minus_8(byte >> 4, dtype) * s
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        acc = _dot(w_low, tl.trans(x_even), acc, IEEE)
        acc = _dot(w_high, tl.trans(x_odd), acc, IEEE)
    out = out_ptr + pid_s * stride_os + rows.to(tl.int64)[None, :] * stride_om + cols[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit(do_not_specialize=["M"])  # rows vary per step (above)
def _rowscaled_matmul_kernel(
    x_ptr, codes_ptr, scale_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_cn, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    col_off = cols.to(tl.int64)[:, None] * stride_cn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=row_ok[:, None], other=0.0)
        # columns past N load nothing (no `other`: fp8 has no literal zero here); they are never stored
        w = tl.load(codes_ptr + col_off + k[None, :], mask=col_ok[:, None]).to(tl.float32).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dequantize_int4_kernel(codes_ptr, scale_ptr, w_ptr, N, K, stride_cn, stride_sn, stride_wn,
                            GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # One program per [BLOCK_N rows, BLOCK_K columns]: a contiguous byte load per row, the two
    # nibbles joined back into column order in registers (the joined pair is thread-local), so
    # each thread stores a contiguous run of columns. A byte's two columns share a group (G is
    # even): its scale is gathered per byte, from L1 after the first row touches it.
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pair = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    ok = (rows < N)[:, None] & (2 * pair < K)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    byte = tl.load(codes_ptr + rows64 * stride_cn + pair[None, :], mask=ok, other=0)
    s = tl.load(scale_ptr + rows64 * stride_sn + (2 * pair // GROUP)[None, :], mask=ok, other=0.0).to(tl.float32)
    low = ((byte & 0xF).to(tl.float32) - 8.0) * s  # exact in float32, rounded once by the store
    high = ((byte >> 4).to(tl.float32) - 8.0) * s
    w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows64 * stride_wn + cols[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & (cols < K)[None, :])


def _bits(codes: torch.Tensor) -> int:
    return 4 if codes.dtype == torch.uint8 else 8


def _block_k(width: int) -> int:
    return next(b for b in (128, 64, 32, 16) if width % b == 0)


def supported(codes: torch.Tensor, scale: torch.Tensor) -> bool:
    """The kernels need K (int8/fp8) or the int4 group size to be a multiple of 16."""
    if _bits(codes) == 8:
        return codes.shape[1] % 16 == 0
    k = codes.shape[1] * 2
    return k % scale.shape[1] == 0 and supported_group(k // scale.shape[1])


def supported_group(group: int) -> bool:
    """Whether the int4 kernels take this group size (the planner asks before any weight exists)."""
    return group % 16 == 0


def _split(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Programs to split the K loop over: enough to keep every SM busy (two waves' worth), each
    with whole K tiles."""
    wanted = 2 * num_sms(device, off_gpu=1)
    split = 1
    while tiles * split < wanted and split < 16 and k % (2 * split * block_k) == 0:
        split *= 2
    return split


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, split: int | None = None,
                 block_n: int | None = None) -> torch.Tensor:
    """Triton: x [M, K] times the quantized weight [N, K] transposed -> [M, N] in x.dtype.
    `split` (tests) forces the number of programs the K loop is split over, `block_n` (tests,
    bench) the weight rows of a tile."""
    bits = _bits(codes)
    m, k = x.shape
    n = codes.shape[0]
    assert codes.shape[1] * (8 // bits) == k, "codes must be [N, K/2] uint8 (int4) or [N, K] (int8/fp8)"
    assert supported(codes, scale), "int4 group size (or K for int8/fp8) must be a multiple of 16"
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes, scale = codes.contiguous(), scale.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if bits == 4:
        group = k // scale.shape[1]
        # one group per tile where G allows; G = 16 (mod 32) takes 32 columns, as each of the two
        # dots (even, odd columns) needs K >= 16
        block_k = _block_k(group) if group % 32 == 0 else 32
        # 64 weight rows: one warpgroup's wgmma rows. Wider tiles re-read x less (4 M / BLOCK_N bytes
        # of x per byte of codes), but on an H100 at 64 rows (8B shapes, in CUDA graphs) 64 beat 128
        # and 256 on all four shapes: more programs in flight outweigh the extra x reads.
        block_n = block_n or 64
    else:
        block_k, block_n = _block_k(k), block_n or 64
    if split is None:
        split = _split(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k, block_k, x.device)
    assert split == 1 or k % (split * block_k) == 0, "split must leave whole K tiles per program"
    k_per_split = triton.cdiv(k, split * block_k) * block_k  # past K only for int4 G = 16 (mod 32)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    common = (m, n, k, k_per_split, x.stride(0), codes.stride(0))
    out_strides = (out.stride(0) if split > 1 else 0, out.stride(-2))
    ieee = x.dtype == torch.float32
    if bits == 4:
        _int4_matmul_kernel[grid](
            x, codes, scale, out, *common, scale.stride(0), *out_strides,
            GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee,
            num_warps=4 if block_n <= 128 else 8, num_stages=4, **pdl(x.device)
        )
    else:
        _rowscaled_matmul_kernel[grid](
            x, codes, scale, out, *common, *out_strides,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=4, num_stages=4, **pdl(x.device)
        )
    return y if split == 1 else out.sum(0).to(x.dtype)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton: the int4 weight [N, K] in `dtype`, in one pass (for matmuls with many rows)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    assert supported(codes, scale), "group size must be a multiple of 16"
    group = k // scale.shape[1]
    codes, scale = codes.contiguous(), scale.contiguous()
    w = torch.empty((n, k), dtype=dtype, device=codes.device)
    # 16 x 256 = 4096 weights a program (32 a thread): the previous one-row, 128-column programs
    # (a 64-thread CTA for every 128 weights) ran at about 0.5 TB/s of output on an H200
    # (kernels/bench_quant.py, 2026-12-01: dequantize + cuBLAS at 256 rows took 144 µs for qkv
    # against cuBLAS's 24); this tile is not yet timed on the card.
    _dequantize_int4_kernel[(triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k, DEQUANT_BLOCK_K))](
        codes, scale, w, n, k, codes.stride(0), scale.stride(0), w.stride(0),
        GROUP=group, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K, num_warps=4, **pdl(codes.device))
    return w


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Torch reference of the weight `quant_matmul` multiplies by (for int8/fp8: before the scale)."""
    if _bits(codes) == 8:
        return codes.to(dtype)
    q = torch.stack((codes & 0xF, codes >> 4), dim=-1).view(codes.shape[0], -1).to(torch.int8) - 8
    n, k = q.shape
    return (q.view(n, scale.shape[1], -1).to(dtype) * scale.to(dtype)[..., None]).view(n, k)


def quant_matmul_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Torch reference of `quant_matmul`: the whole weight in x.dtype, then one matmul."""
    y = x @ dequantize_ref(codes, scale, x.dtype).T
    return y * scale.to(x.dtype) if _bits(codes) == 8 else y

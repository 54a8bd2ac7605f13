"""y = x @ W.T for 1-8 rows of x with W in int4, on tensor cores: the int4 decode step's linears.

Format as in kernels/quant_matmul.py: codes uint8 [N, K/2] (column 2j in the low nibble of byte
j, 2j + 1 in the high one, each q + 8), scale [N, K/G] in the activation dtype. Read here as int32
words: nibble i of word j is column 8j + i.

Why tensor cores for a GEMV: kernels/quant_gemv.py's int4 GEMV turns every code into a float and
multiplies it on the FMA pipe, 4.4 instructions a code, and repeats that work for every row of x
(its 4-row layer took 264 µs on an H200 against 65 at one row). Here `mma.sync.m16n8k16` takes the
products: x's rows are the eight columns of the MMA's B operand (one to eight decode rows cost the
same), and a code costs what it takes to become a bf16 (fp16) in an A-operand register.

The unpack (PTX in `_asm`) takes one word and makes four bf16x2 registers: `lop3` puts nibbles k
and k + 4 (bits 4k and 16 + 4k after a shift) into the low mantissa bits of 128.0 in both halves,
an `fma` subtracts 136, leaving q - 8 exactly. Each register is exactly one register of an A
fragment, because K is ours to order: a dot product does not change when the same permutation is
applied to both operands' K. Thread t of a quad (lane = 4g + t) owns words 4t..4t+3 of a 128-column
slab of rows g and g + 8 of a 16-row tile; word u fills logical k16 chunks 2u and 2u + 1, its
nibble pairs (0, 4), (1, 5), (2, 6), (3, 7) the fragment slots (k = 2t | 2t + 1, 2t + 8 | 2t + 9) of
chunk 2u, then of chunk 2u + 1. The thread loads x at the same 32 natural columns and `prmt`
pairs them the same way. No shared memory, no layout conversion: Gluon (Triton's explicit-layout
dialect) pins which lane holds which word, which plain Triton cannot promise.

The group scale multiplies a slab's partial sums once (a slab of 128 columns lies in one group:
G % 128 == 0), adding them to the accumulators (c0, c1: row g, x rows 2t, 2t + 1; c2, c3: row g + 8).
A program is one 16-row tile, or two at more than two rows of x (a lane's x registers then serve both:
eight rows of x are twice the bytes of a slab's codes); its warps split K (a warp takes every W-th
slab) and are summed once at the end. `tiles_and_warps` picks both per shape.

Products are exact in float32 from (q - 8) and x; the scale multiplies the float32 sum. The
reference (kernels.quant_matmul.quant_matmul_ref) rounds W to x's dtype first, so bf16 results differ
from it by that rounding, as quant_gemv's do. PTX only: the interpreter cannot run it (the CPU tests
run `_asm`'s PTX on an emulated warp instead); int4_linear takes it on CUDA (compute capability 8.0+)
and keeps the Triton GEMV elsewhere.
"""

from __future__ import annotations

import torch

from kernels._mma_gemv import HAS_GLUON, has_mma_sync
from kernels._triton import pdl

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from kernels._mma_gemv import lanes, outputs, pdl_enter

MAX_ROWS = 8  # x's rows are the MMA's eight B columns
SLAB = 128  # columns a warp step covers: 4 lanes x 4 words x 8 codes
UNROLL = 2  # slabs a warp loads before it computes


def _asm(dtype: str) -> str:
    """PTX for one thread's slab: $0-$3 the new accumulators; in: $4-$7 words of row g, $8-$11 of
    row g + 8, $12-$15 / $16-$19 x's columns 0-3 / 4-7 of each word (int64: two pairs), $20-$23 /
    $24-$27 the two rows' scales, $28-$31 the accumulators."""
    magic, one, minus_bias = {"bf16": ("0x43004300", "0x3F803F80", "0xC308C308"),  # 128, 1, -136
                              "f16": ("0x64006400", "0x3C003C00", "0xE408E408")}[dtype]  # 1024, 1, -1032
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32"
    lines = ["{", ".reg .b32 a<4>, b<4>, s, one, nb, xb<4>, p<4>;", ".reg .f32 c<4>;",
             f"mov.b32 one, {one};", f"mov.b32 nb, {minus_bias};"]
    lines += [f"mov.f32 c{i}, 0f00000000;" for i in range(4)]
    for u in range(4):
        for reg, first in (("a", 4), ("b", 8)):  # a: row g's word u, b: row g + 8's
            word = f"${first + u}"
            lines.append(f"lop3.b32 {reg}0, {word}, 0x000F000F, {magic}, 0xea;")  # (w & mask) | magic
            for k in (1, 2, 3):
                lines += [f"shr.u32 s, {word}, {4 * k};", f"lop3.b32 {reg}{k}, s, 0x000F000F, {magic}, 0xea;"]
            lines += [f"fma.rn.{dtype}x2 {reg}{k}, {reg}{k}, one, nb;" for k in range(4)]
        # x pairs (0, 1) (2, 3) (4, 5) (6, 7) -> (0, 4) (1, 5) (2, 6) (3, 7), as the nibbles pair
        lines += [f"mov.b64 {{p0, p1}}, ${12 + u};", f"mov.b64 {{p2, p3}}, ${16 + u};",
                  "prmt.b32 xb0, p0, p2, 0x5410;", "prmt.b32 xb1, p0, p2, 0x7632;",
                  "prmt.b32 xb2, p1, p3, 0x5410;", "prmt.b32 xb3, p1, p3, 0x7632;"]
        lines.append(f"{mma} {{c0, c1, c2, c3}}, {{a0, b0, a1, b1}}, {{xb0, xb1}}, {{c0, c1, c2, c3}};")
        lines.append(f"{mma} {{c0, c1, c2, c3}}, {{a2, b2, a3, b3}}, {{xb2, xb3}}, {{c0, c1, c2, c3}};")
    lines += ["fma.rn.f32 $0, c0, $20, $28;", "fma.rn.f32 $1, c1, $21, $29;",
              "fma.rn.f32 $2, c2, $24, $30;", "fma.rn.f32 $3, c3, $25, $31;", "}"]
    return "\n".join(lines)


# out: 4 accumulators; in: 8 words, 8 int64 x (two bf16 pairs each), 8 scales, 4 accumulators
CONSTRAINTS = ",".join(["=f"] * 4 + ["r"] * 8 + ["l"] * 8 + ["f"] * 12)

if HAS_GLUON:
    _ASM_BF16 = gl.constexpr(_asm("bf16"))
    _ASM_F16 = gl.constexpr(_asm("f16"))
    _CONSTRAINTS = gl.constexpr(CONSTRAINTS)

    @gluon.jit
    def _int4_mma_gemv_kernel(x_ptr, words_ptr, scale_ptr, y_ptr, M, N, K,
                              stride_xm, stride_wn, stride_sn, stride_ym,
                              GROUP: gl.constexpr, T: gl.constexpr, W: gl.constexpr, UNROLL: gl.constexpr,
                              ASM: gl.constexpr, PDL: gl.constexpr):
        pdl_enter(PDL)
        # [T tiles, W warps, 8 g, 16 (t, u)]: lane 4g + t of warp w holds its T x 4 words in registers
        L: gl.constexpr = gl.BlockedLayout([T, 1, 1, 4], [1, 1, 8, 4], [1, W, 1, 1], [3, 2, 1, 0])
        tile, w, g, tu = lanes(L, T, W)
        n0 = gl.program_id(0) * (16 * T)
        rows = (n0 + 16 * tile + g).to(gl.int64)
        lo_ptrs = words_ptr + rows * stride_wn + w * 16 + tu
        hi_ptrs = lo_ptrs + 8 * stride_wn
        # x as int64 (four columns each): lane g reads x's row g (shared by the T tiles), zero past M
        x_ptrs = (x_ptr.to(gl.pointer_type(gl.int64), bitcast=True) + g.to(gl.int64) * (stride_xm // 4)
                  + (w * 16 + tu) * 2)
        x_ok = g < M
        slo_ptrs = scale_ptr + rows * stride_sn
        shi_ptrs = slo_ptrs + 8 * stride_sn
        acc = gl.zeros([T, W, 8, 16], gl.float32, L)
        for k0 in range(0, K // 8, W * 16 * UNROLL):
            for r in gl.static_range(UNROLL):
                kw = k0 + r * (W * 16)
                slab = kw + w * 16  # each warp's first word
                ok = slab * 8 < K  # per warp: its slab lies inside K (masked loads read nothing)
                lo = gl.load(lo_ptrs + kw, mask=ok, other=0)
                hi = gl.load(hi_ptrs + kw, mask=ok, other=0)
                x03 = gl.load(x_ptrs + kw * 2, mask=ok & x_ok, other=0)
                x47 = gl.load(x_ptrs + kw * 2 + 1, mask=ok & x_ok, other=0)
                group = (slab * 8) // GROUP
                s_lo = gl.load(slo_ptrs + group, mask=ok, other=0.0).to(gl.float32)
                s_hi = gl.load(shi_ptrs + group, mask=ok, other=0.0).to(gl.float32)
                acc = gl.inline_asm_elementwise(ASM, _CONSTRAINTS, [lo, hi, x03, x47, s_lo, s_hi, acc],
                                                dtype=gl.float32, is_pure=True, pack=4)
        out = gl.sum(acc, axis=1)  # the warps' slabs added: [T, 8 g, 16 (t, u)], u = accumulator c_u
        row, m = outputs(n0, L, T)  # each accumulator's weight row and x row
        gl.store(y_ptr + m.to(gl.int64) * stride_ym + row, out.to(y_ptr.dtype.element_ty), mask=(m < M) & (row < N))


def tiles_and_warps(m: int, n: int, k: int) -> tuple[int, int]:
    """(16-row tiles a warp, warps a program splits K over) for x of m rows and a weight [n, k].
    One or two rows: one tile, `warps_for`. More: two tiles a warp where N allows (x's loads, up to
    eight rows of them, then serve twice the codes), and fewer warps: at most one a 512 columns and
    1,024 in all, at least two. On an H200 (2026-12-01, BENCHMARKS.md session 11), a layer's four
    linears: 4 rows 61.9 µs against 69.3 for one tile, 8 rows 70.8 against 97.8 (gate_up 30.2
    against 45.2); 2 rows 60.4 against 60.1."""
    if m <= 2 or n % 32:
        return 1, warps_for(n, k)
    warps = 16
    while warps > 2 and (warps * 512 > k or n // 32 * warps > 1024):
        warps //= 2
    return 2, warps


def warps_for(n: int, k: int) -> int:
    """Warps a 16-row program splits K over at one row: at most one a 512 columns (two slabs each), and
    at most 4,096 warps for the whole weight, at least 4. On an H200 (2026-12-01, µs a call at one row,
    BENCHMARKS.md session 10): qkv 8 warps 9.0 (16: 12.6), o 8: 7.5 (4: 8.9), gate_up 4: 23.6
    (8: 32.0), down (K = 14,336) 16: 16.0 (8: 16.6, 4: 26.2)."""
    warps = 16
    while warps > 4 and (warps * 512 > k or n // 16 * warps > 4096):
        warps //= 2
    return warps


def supported(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> bool:
    """CUDA (8.0+) bf16 / fp16 x of 1-8 rows, 16 | N, 128 | group size, rows of x and codes that
    load as int64 / int32."""
    if not (HAS_GLUON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    m, k = x.shape
    n = codes.shape[0]
    return (1 <= m <= MAX_ROWS and n % 16 == 0 and k % SLAB == 0 and (k // scale.shape[1]) % SLAB == 0
            and x.stride(1) == 1 and x.stride(0) % 4 == 0 and x.data_ptr() % 8 == 0
            and codes.is_contiguous() and codes.data_ptr() % 4 == 0 and scale.stride(1) == 1
            and has_mma_sync(x.device.index or 0))


def int4_mma_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                  tiles: int = 0, warps: int = 0) -> torch.Tensor:
    """x [M <= 8, K] times the int4 weight [N, K] transposed -> [M, N] in x.dtype (see `supported`).
    `tiles` / `warps` (tests, bench) override `tiles_and_warps`."""
    assert supported(x, codes, scale), "int4_mma_gemv: unsupported operands (see supported())"
    m, k = x.shape
    n = codes.shape[0]
    words = codes.view(torch.int32)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rule = tiles_and_warps(m, n, k)
    tiles, warps = tiles or rule[0], warps or rule[1]
    assert n % (16 * tiles) == 0, "int4_mma_gemv: N must be a multiple of 16 x tiles"
    # Programmatic dependent launch at one row only: through the engine on an H200 batch-1 decode ran
    # 406.7 tok/s with it against 398.6 (session 10), but 8-row decode steps took 0.830 s with it against
    # 0.795 without (8 requests x 256 tokens, BENCHMARKS.md session 11)
    _int4_mma_gemv_kernel[(n // (16 * tiles),)](
        x, words, scale, y, m, n, k, x.stride(0), words.stride(0), scale.stride(0), y.stride(0),
        GROUP=k // scale.shape[1], T=tiles, W=warps, UNROLL=UNROLL,
        ASM=_ASM_BF16 if x.dtype == torch.bfloat16 else _ASM_F16, num_warps=warps,
        **(pdl(x.device) if m == 1 else {"PDL": False}))
    return y

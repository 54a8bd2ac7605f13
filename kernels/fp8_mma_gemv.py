"""y = x @ W.T for 1-8 rows of x with W in fp8 (e4m3) and a float32 scale per row, on tensor cores:
the fp8 decode step's linears at 2-8 rows (`faster`; one row keeps kernels/quant_gemv.py's GEMV, more
rows quant_matmul, then W8A8 in kernels/fp8_linear.py).

The layout and the loop are kernels/int4_mma_gemv.py's (read its docstring first): `mma.sync.m16n8k16`
takes the products, x's rows are the MMA's eight B columns, and each lane's loaded word *is* its A
fragment because K is permuted identically on both operands. Here a word holds four codes (one k16
chunk of one row): lane 4g + t owns words 4t..4t+3 of a 64-column slab of rows g and g + 8, and x's
four columns of the same word are, as loaded (one int64), the chunk's two B registers: bytes 0, 1 of
the word fill slots k = 2t, 2t + 1, bytes 2, 3 slots 2t + 8, 2t + 9, for both operands.

A code becomes a bf16 (fp16) with no conversion instruction, which sm_80 lacks and sm_90 has only
for fp16: `prmt` spreads two codes into the two halves of a register with the sign copied over
each half's high byte; one shift puts the exponent and mantissa where bf16's low exponent and high
mantissa bits are (fp16's, one bit higher), and the sign bit over the half's sign; a mask clears the
rest. That half is the code's value times 2^-120 (2^-8), exact, fp8's subnormals included (they
land on bf16 / fp16 subnormals); one `fma` by 2^120 (2^8) restores it, exactly. Four instructions
for two codes, no shared memory.

The row scale multiplies the float32 sums once at the end. Products are exact in float32 (codes and
x are exact in x's dtype), so results differ from the one-row GEMV (quant_gemv.rowscaled_gemv) and
from float64 products by summation order only. PTX only: the CPU tests run `_asm`'s PTX on an
emulated warp (tests/kernels/ptx_warp.py).
"""

from __future__ import annotations

import torch

from kernels._mma_gemv import HAS_GLUON, has_mma_sync

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from kernels._mma_gemv import lanes, outputs

FP8 = torch.float8_e4m3fn
MAX_ROWS = 8  # x's rows are the MMA's eight B columns
SLAB = 64  # columns a warp step covers: 4 lanes x 4 words x 4 codes
UNROLL = 2  # slabs a warp loads before it computes
MAX_K = 8192  # longer rows: quant_matmul is faster (see `faster`)

# per dtype: the shift that puts a code's exponent on the half's, the mask that keeps exponent,
# mantissa and sign, and the power of two (bf16x2 / f16x2 bits) that undoes the exponent bias
_UNPACK = {"bf16": (4, "0x87F087F0", "0x7B807B80"),  # 2^120: bf16's bias 127 against e4m3's 7
           "f16": (7, "0xBF80BF80", "0x5C005C00")}  # 2^8: fp16's bias 15
# prmt selectors: result bytes (code, its sign over 8 bits, code, sign) from bytes (0, 1) or (2, 3)
_SPREAD = ("0x9180", "0xB3A2")


def _constants(dtype: str) -> list[str]:
    """PTX setting the registers `_unpack` reads: power (2^120 or 2^8, twice) and nz (-0.0 twice: an
    fma adding -0 keeps a zero's sign)."""
    return [f"mov.b32 power, {_UNPACK[dtype][2]};", "mov.b32 nz, 0x80008000;"]


def _unpack(reg: str, word: str, pair: int, dtype: str) -> list[str]:
    """PTX: the codes in bytes (0, 1) (pair 0) or (2, 3) (pair 1) of the int32 `word` -> `reg`, two
    values of x's dtype, exactly."""
    shift, mask, _ = _UNPACK[dtype]
    return [f"prmt.b32 {reg}, {word}, 0, {_SPREAD[pair]};", f"shl.b32 {reg}, {reg}, {shift};",
            f"and.b32 {reg}, {reg}, {mask};", f"fma.rn.{dtype}x2 {reg}, {reg}, power, nz;"]


def _asm(dtype: str) -> str:
    """PTX for one thread's slab: $0-$3 the new accumulators; in: $4-$7 words of row g, $8-$11 of
    row g + 8, $12-$15 x's four columns of each word (int64), $16-$19 the accumulators."""
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32"
    lines = ["{", ".reg .b32 a<4>, xb<2>, power, nz;", ".reg .f32 c<4>;"] + _constants(dtype)
    lines += [f"mov.f32 c{i}, ${16 + i};" for i in range(4)]
    for u in range(4):
        # a0 / a2: row g's bytes (0, 1) / (2, 3); a1 / a3: row g + 8's
        for reg, word, pair in (("a0", 4, 0), ("a2", 4, 1), ("a1", 8, 0), ("a3", 8, 1)):
            lines += _unpack(reg, f"${word + u}", pair, dtype)
        lines.append(f"mov.b64 {{xb0, xb1}}, ${12 + u};")
        lines.append(f"{mma} {{c0, c1, c2, c3}}, {{a0, a1, a2, a3}}, {{xb0, xb1}}, {{c0, c1, c2, c3}};")
    lines += [f"mov.f32 ${i}, c{i};" for i in range(4)] + ["}"]
    return "\n".join(lines)


# out: 4 accumulators; in: 8 words, 4 int64 x (four columns each), 4 accumulators
CONSTRAINTS = ",".join(["=f"] * 4 + ["r"] * 8 + ["l"] * 4 + ["f"] * 4)

if HAS_GLUON:
    _ASM_BF16 = gl.constexpr(_asm("bf16"))
    _ASM_F16 = gl.constexpr(_asm("f16"))
    _CONSTRAINTS = gl.constexpr(CONSTRAINTS)

    @gluon.jit
    def _fp8_mma_gemv_kernel(x_ptr, words_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                             T: gl.constexpr, W: gl.constexpr, UNROLL: gl.constexpr, ASM: gl.constexpr):
        # [T tiles, W warps, 8 g, 16 (t, u)]: lane 4g + t of warp w holds its T x 4 words in registers
        L: gl.constexpr = gl.BlockedLayout([T, 1, 1, 4], [1, 1, 8, 4], [1, W, 1, 1], [3, 2, 1, 0])
        tile, w, g, tu = lanes(L, T, W)
        n0 = gl.program_id(0) * (16 * T)
        lo_ptrs = words_ptr + (n0 + 16 * tile + g).to(gl.int64) * stride_wn + w * 16 + tu
        hi_ptrs = lo_ptrs + 8 * stride_wn
        # x as int64, the four columns of a word: lane g reads x's row g (shared by the T tiles), zero past M
        x_ptrs = x_ptr.to(gl.pointer_type(gl.int64), bitcast=True) + g.to(gl.int64) * (stride_xm // 4) + w * 16 + tu
        x_ok = g < M
        acc = gl.zeros([T, W, 8, 16], gl.float32, L)
        for k0 in range(0, K // 4, W * 16 * UNROLL):
            for r in gl.static_range(UNROLL):
                kw = k0 + r * (W * 16)
                ok = (kw + w * 16) * 4 < K  # per warp: its slab lies inside K (masked loads read nothing)
                lo = gl.load(lo_ptrs + kw, mask=ok, other=0)
                hi = gl.load(hi_ptrs + kw, mask=ok, other=0)
                x = gl.load(x_ptrs + kw, mask=ok & x_ok, other=0)
                acc = gl.inline_asm_elementwise(ASM, _CONSTRAINTS, [lo, hi, x, acc],
                                                dtype=gl.float32, is_pure=True, pack=4)
        out = gl.sum(acc, axis=1)  # the warps' slabs added: [T, 8 g, 16 (t, u)], u = accumulator c_u
        row, m = outputs(n0, L, T)  # each accumulator's weight row and x row
        out = out * gl.load(scale_ptr + row)
        gl.store(y_ptr + m.to(gl.int64) * stride_ym + row, out.to(y_ptr.dtype.element_ty), mask=m < M)


def tiles_and_warps(m: int, n: int, k: int) -> tuple[int, int]:
    """(16-row tiles a warp, warps a program splits K over) for x of m rows and a weight [n, k]: one
    tile and 8 warps while that makes at most 4,096 warps, else two tiles and 4 warps; fewer warps
    where K is short (at least 256 columns each). On an H200 (2026-12-01, µs a call at 2 / 8 rows,
    BENCHMARKS.md session 11): qkv 1 x 8 12.1 / 12.1 (2 x 8: 15.1 / 15.3), o 1 x 8 9.8 / 10.0,
    gate_up 2 x 4 35.4 / 36.0 (1 x 8: 45.8 / 47.3)."""
    tiles = 2 if n // 16 * 8 > 4096 and n % 32 == 0 else 1
    warps = 8 // tiles
    while warps > 2 and warps * 256 > k:
        warps //= 2
    return tiles, warps


def faster(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Where this kernel beats the fp8 paths before it, on an H200 (2026-12-01, µs a call at 2 / 8
    rows; BENCHMARKS.md session 11): 2-8 rows (at one row the FMA-pipe GEMV of kernels/quant_gemv.py
    reads faster: a layer 61.7 against 87.3) and K up to 8,192 (down, K = 14,336: quant_matmul 22.4 /
    23.0 against 25.1 / 25.4; qkv, o and gate_up 12.1 / 9.8 / 35.4 against 13.7 / 12.4 / 47.1)."""
    return 2 <= x.shape[0] <= MAX_ROWS and codes.shape[1] <= MAX_K


def supported(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> bool:
    """CUDA (8.0+) bf16 / fp16 x of 1-8 rows, fp8 e4m3 codes [N, K] with 16 | N and 64 | K, float32
    row scales [N]; rows of x and codes that load as int64 / int32."""
    if not (HAS_GLUON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and codes.dtype == FP8):
        return False
    m, k = x.shape
    n = codes.shape[0]
    return (1 <= m <= MAX_ROWS and n % 16 == 0 and k % SLAB == 0 and codes.shape[1] == k
            and x.stride(1) == 1 and x.stride(0) % 4 == 0 and x.data_ptr() % 8 == 0
            and codes.is_contiguous() and codes.data_ptr() % 4 == 0
            and scale.dtype == torch.float32 and scale.shape == (n,) and scale.is_contiguous()
            and has_mma_sync(x.device.index or 0))


def fp8_mma_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 tiles: int = 0, warps: int = 0) -> torch.Tensor:
    """x [M <= 8, K] times the fp8 weight [N, K] transposed, times the row scale -> [M, N] in x.dtype
    (see `supported`). `tiles` / `warps` (tests, bench) override `tiles_and_warps`."""
    assert supported(x, codes, scale), "fp8_mma_gemv: unsupported operands (see supported())"
    m, k = x.shape
    n = codes.shape[0]
    words = codes.view(torch.int32)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rule = tiles_and_warps(m, n, k)
    tiles, warps = tiles or rule[0], warps or rule[1]
    assert n % (16 * tiles) == 0, "fp8_mma_gemv: N must be a multiple of 16 x tiles"
    # No programmatic dependent launch (no griddepcontrol in the kernel), unlike the other decode
    # kernels: through the engine (8 requests x 256 tokens, 8-row decode steps, H200, BENCHMARKS.md session 11) decode took
    # 1.021 s with it, 0.884 s without, 0.918 s on quant_matmul.
    _fp8_mma_gemv_kernel[(n // (16 * tiles),)](
        x, words, scale, y, m, n, k, x.stride(0), words.stride(0), y.stride(0),
        T=tiles, W=warps, UNROLL=UNROLL, ASM=_ASM_BF16 if x.dtype == torch.bfloat16 else _ASM_F16,
        num_warps=warps)
    return y

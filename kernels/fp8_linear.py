"""W8A8 fp8: y = x @ W.T on fp8 tensor cores, x quantized per token on the fly.

Weights are float8_e4m3fn codes [N, K] with a float32 scale per output row (quantized at load,
framework/layers/quantization/fp8.py). Each call quantizes the activations x [M, K] the same
way, one scale per row (token): s_x[m] = max_k |x[m, k]| / 448, codes round(x / s_x) in e4m3.
Then y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] * wq[n, k], which `torch._scaled_mm` computes
with row-wise scales (scale_a [M, 1], scale_b [1, N], float32) on Hopper / Ada fp8 tensor cores
(cuBLASLt on sm90 with CUDA >= 12.9, else CUTLASS), accumulating in float32 and writing x.dtype.

Against weight-only fp8 the matmul reads one byte per weight *and* runs at twice the bf16
tensor-core rate, with no dequantized weight copy. The cost is the rounding of x to 3 mantissa
bits (relative error up to 2^-4 per element, mostly averaging out in the dot products).

`quantize_rows` is the Triton kernel: one program per row, the absmax first (one pass when the
row fits one tile, else a loop over tiles), then the codes. Its torch reference
`quantize_rows_ref` is the spec, and `fp8_linear_ref` (dequantize both, one float32 matmul) is
the reference of the whole product. Triton's CPU interpreter rounds float32 -> e4m3 wrongly near
powers of two (triton 3.9), so the kernel is tested on the GPU only.
"""

from __future__ import annotations

import functools

import torch

from kernels._triton import next_pow2, tl, triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
MIN_SCALE = 1e-12 / FP8_MAX  # an all-zero row (a padded graph row) keeps a usable scale
QUANT_BLOCK_K = 4096  # widest tile a program holds: K = 4096 in one pass, 14336 in four tiles
_MIN_SCALE = tl.constexpr(MIN_SCALE)
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_TILE:  # the row stays in registers between the absmax and the codes
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        amax = tl.max(amax, axis=0)
    # div_rn: IEEE division as torch does it (`/` is an approximate one here), so the codes match
    scale = tl.maximum(tl.div_rn(amax, _FP8_MAX), _MIN_SCALE)
    tl.store(s_ptr + row, scale)
    if ONE_TILE:
        q = tl.clamp(tl.div_rn(x, scale), -_FP8_MAX, _FP8_MAX)
        tl.store(q_row + cols, q.to(tl.float8e4nv), mask=cols < K)
    else:  # the second read of the row mostly hits L2
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            q = tl.clamp(tl.div_rn(x, scale), -_FP8_MAX, _FP8_MAX)
            tl.store(q_row + k0 + cols, q.to(tl.float8e4nv), mask=k0 + cols < K)


def quantize_rows(x: torch.Tensor, block_k: int = QUANT_BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: x [M, K] (any float dtype, unit column stride) -> (float8_e4m3fn codes [M, K],
    float32 scales [M, 1]). `block_k` (tests) caps the tile; a power of two."""
    assert x.dim() == 2, "x must be [M, K]"
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    tile = min(block_k, next_pow2(k))
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=tile, ONE_TILE=tile >= k,
                                num_warps=8 if tile >= 2048 else 4)
    return q, s


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `quantize_rows` (the spec): the same codes and scales."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    # e4m3fn has no infinity: an out-of-range cast is NaN, so clamp (x / scale can round past 448)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _fp8_dot_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, k_per_split,
                    stride_xm, stride_wn, stride_os, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr):
    """acc[n, m] = sum_k w[n, k] * xq[m, k] over this program's K range, on fp8 tensor cores:
    the weight tile is the dot's first operand (its rows fill the MMA's M side), x's few rows
    its second. SCALE: apply both row scales and store x.dtype; else store float32 partials."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows = output columns
    rows = tl.arange(0, BLOCK_M)
    col_ok, row_ok = cols < N, rows < M
    kk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + kk[None, :]
    x_ptrs = xq_ptr + rows.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        # weight rows past N load nothing (fp8 has no literal zero); their sums are never stored.
        # x codes arrive as bytes, so padded rows can be zeros.
        w = tl.load(w_ptrs + k0, mask=col_ok[:, None])
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0).to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(w, tl.trans(x), acc)
    out = out_ptr + pid_s * stride_os + rows.to(tl.int64)[None, :] * stride_om + cols[:, None]
    if SCALE:
        acc *= tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[:, None]
        acc *= tl.load(xs_ptr + rows, mask=row_ok, other=0.0)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


DOT_MAX_ROWS = 16  # fp8_dot's x rows: one MMA's N side
DOT_BLOCK_N, DOT_BLOCK_K = 16, 512
# Up to this many rows fp8_linear runs fp8_dot instead of torch._scaled_mm (0: never). Set from
# kernels/bench.py --fp8 on an H200.
DOT_DISPATCH_MAX_ROWS = 0


def dot_supported(codes: torch.Tensor) -> bool:
    return codes.shape[1] % DOT_BLOCK_K == 0


def fp8_dot(xq: torch.Tensor, xs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
            block_n: int = DOT_BLOCK_N, block_k: int = DOT_BLOCK_K, split: int = 1, num_warps: int = 4,
            num_stages: int = 4) -> torch.Tensor:
    """Triton: quantized x (codes [M, K] with M <= DOT_MAX_ROWS, scales [M, 1]) times the fp8
    weight [N, K] transposed -> [M, N] in out_dtype. For few rows, where a library GEMM pads x to
    its tile and leaves most SMs idle: BLOCK_N weight rows a program, the K loop `split` over
    programs (partial sums in float32, added in a fixed order). K must divide into block_k * split."""
    m, k = xq.shape
    n = codes.shape[0]
    assert m <= DOT_MAX_ROWS and codes.shape[1] == k and k % (block_k * split) == 0
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=xq.device)
    _fp8_dot_kernel[(triton.cdiv(n, block_n), split)](
        xq.view(torch.uint8), xs, codes, scale, out, m, n, k, k // split, xq.stride(0), codes.stride(0),
        out.stride(0) if split > 1 else 0, out.stride(-2),
        BLOCK_M=DOT_MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, SCALE=split == 1,
        num_warps=num_warps, num_stages=num_stages)
    if split == 1:
        return y
    return (out.sum(0) * xs * scale[None, :]).to(out_dtype)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def native_fp8(x: torch.Tensor) -> bool:
    """True where fp8 x fp8 matmuls run on tensor cores: a CUDA device of compute capability 8.9
    (Ada) or newer, with `torch._scaled_mm`. Elsewhere the fp8 methods stay weight-only."""
    if not x.is_cuda or not hasattr(torch, "_scaled_mm"):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """What `fp8_linear` takes: 16- or 32-bit float x on a native-fp8 device, and K and N
    multiples of 16 (the fp8 GEMM's alignment)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and codes.dtype == FP8 and native_fp8(x)
            and codes.shape[0] % 16 == 0 and codes.shape[1] % 16 == 0)


# use_fast_accum: Hopper's fp8 MMA accumulates in reduced precision unless partial sums are
# promoted to float32 every few steps; cuBLAS then promotes. Kept off (exact float32 sums) until
# kernels/bench.py shows that the fast mode pays (`--fp8` times both).
FAST_ACCUM = False


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               fast_accum: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times the fp8 weight [N, K] (row scales `scale` [N], float32),
    transposed, plus bias [N] -> [M, N] in x.dtype: `quantize_rows`, then one `torch._scaled_mm`."""
    xq, xs = quantize_rows(x)
    if x.shape[0] <= DOT_DISPATCH_MAX_ROWS and dot_supported(codes) and bias is None:
        return fp8_dot(xq, xs, codes, scale, x.dtype)
    # codes [N, K] row-major is the column-major [K, N] operand cuBLASLt wants on Hopper
    return torch._scaled_mm(xq, codes.t(), scale_a=xs, scale_b=scale.view(1, -1), bias=bias,
                            out_dtype=x.dtype, use_fast_accum=FAST_ACCUM if fast_accum is None else fast_accum)


def fp8_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `fp8_linear`: both operands dequantized, one float32 matmul."""
    xq, xs = quantize_rows_ref(x)
    y = (xq.float() @ codes.float().T) * xs * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

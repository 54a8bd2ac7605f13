"""y = x @ W.T (+ bias) for a few rows of x: the unquantized linears of a decode step.

Why a kernel: at batch 1 a linear is a GEMV whose time is the weight bytes, and cuBLAS leaves
bandwidth unused on Llama-3.1-8B shapes (measured on an H100, bf16: 70-95% of copy bandwidth;
a plain Triton GEMV reached 82-101%).

Each program owns BLOCK_N output columns (weight rows) and walks K in BLOCK_K tiles. A weight
tile is loaded once and multiplied by every row of x before the next tile, so the weight is
read once per call whatever the number of rows (up to MAX_ROWS: the row loop is unrolled).
The product is elementwise multiply + `tl.sum` in float32, not `tl.dot`: with 1-8 rows there is
nothing for tensor cores to do, and Triton's CPU interpreter computes bf16 `tl.dot` wrongly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton

MAX_ROWS = 8  # the kernel's limit: its row loop is unrolled
# What the dispatch (kernels.linear) sends here. On an H100 (bf16, 8B shapes, 2026-11-25) the GEMV
# beat cuBLAS by 5-20% at one row and lost by 16-43% at four, where the per-row reductions cost
# more than the bandwidth they save.
GEMV_MAX_ROWS = 1

# 4 weight rows per program: N/4 programs (1024 for a 4096-wide output) fill every SM several
# times over, and a 4 x 2 KiB tile is 8 KiB in flight per program per step. A K tile of 2 KiB
# per row (1024 bf16, 512 fp32) gives each of 4 warps' 128 threads one 16-byte load per row.
BLOCK_N = 4
BLOCK_K_BYTES = 2048
NUM_WARPS = 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, K,
    stride_xm, stride_wn,
    ROWS: tl.constexpr, ROWS_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    rows = tl.arange(0, ROWS_P2)  # Triton shapes are powers of two; rows >= ROWS are never stored
    # acc[n, m] (output column, x row): laid out like the weight tile's row sums, so adding a
    # row's partial sums needs no layout change; transposed back at the store.
    acc = tl.zeros((BLOCK_N, ROWS_P2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        # Each weight byte is read once: evict it first, keeping x (read by every program) in L2.
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        for m in tl.static_range(ROWS):
            x = tl.load(x_ptr + m * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1)
            acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + rows[None, :] * N + cols[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=col_ok[:, None] & (rows < ROWS)[None, :])


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_gemv` takes this call: few rows, and a contiguous 2-D weight of x's
    (floating) dtype on x's device whose width matches x."""
    if x.dim() == 0 or x.dtype not in _DTYPES or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return (0 < rows <= GEMV_MAX_ROWS and weight.dim() == 2 and weight.is_contiguous()
            and weight.dtype == x.dtype and weight.device == x.device and weight.shape[1] == x.shape[-1])


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                block_n: int = BLOCK_N, block_k: int | None = None) -> torch.Tensor:
    """Triton: x [M, K] (M <= MAX_ROWS) times weight [N, K] transposed, plus bias [N]
    -> [M, N] in x.dtype, accumulated in float32. `block_n`/`block_k` (tests) override the tile."""
    m, k = x.shape
    n = weight.shape[0]
    assert 0 < m <= MAX_ROWS, f"linear_gemv takes 1..{MAX_ROWS} rows, got {m}"
    assert weight.shape == (n, k) and weight.stride(1) == 1, "weight must be [N, K] with unit column stride"
    assert bias is None or bias.shape == (n,), "bias must be [N]"
    x = x if x.stride(1) == 1 else x.contiguous()
    if block_k is None:  # no wider than K: a tile past K would only load masked lanes
        block_k = min(BLOCK_K_BYTES // weight.element_size(), next_pow2(k))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias.contiguous() if bias is not None else y  # placeholder pointer (never read)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, b, y, n, k, x.stride(0), weight.stride(0),
        ROWS=m, ROWS_P2=next_pow2(m), HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
        **pdl(x.device)
    )
    return y


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `linear_gemv`: F.linear."""
    return F.linear(x, weight, bias)

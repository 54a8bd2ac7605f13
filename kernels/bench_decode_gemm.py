"""GPU probe: the linears of a full decode batch (128-256 rows, Llama-3.1-8B shapes, bf16), where
bench's profile puts a third of a decode step. cuBLAS's tiles at these row counts can leave SMs
idle (a 256x128 tile over N=4096 is 32 CTAs on 132 SMs), so this times, per shape:
F.linear as the engine calls it, the same under the other BLAS backend, and a plain Triton tiled
GEMM at a few tile configs (correctness checked against F.linear).

    python -m kernels.bench_decode_gemm

Weights rotate over copies past the L2 cache; times are CUDA-graph replays (no launch gaps), median.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from kernels._triton import tl, triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (128, 256, 64, 8, 3),
]


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[M, N] = x[M, K] @ w[N, K]^T; program ids run along N fastest so neighbours share x tiles.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pm, pn = pid // num_n, pid % num_n
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None], mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(x, w, acc)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_linear(x: torch.Tensor, w: torch.Tensor, cfg) -> torch.Tensor:
    bm, bn, bk, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _matmul_kernel[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def _us(fn) -> float:
    return 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")


def main() -> None:
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}: µs a call, graph-replayed; Triton configs (bm, bn, bk, warps, stages)")
    for rows in (256, 128):
        for name, (n, k) in SHAPES.items():
            copies = max(2, (256 << 20) // (n * k * 2))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            it = itertools.cycle(ws)
            flops = 2 * rows * n * k
            line = [f"{name:<8} {rows:>4} rows"]
            base = _us(lambda: F.linear(x, next(it)))
            line.append(f"cuBLAS {base:7.1f} ({flops / base / 1e6:4.0f} TF/s)")
            try:
                prev = torch.backends.cuda.preferred_blas_library()
                other = "cublas" if "Lt" in str(prev) else "cublaslt"
                torch.backends.cuda.preferred_blas_library(other)
                alt = _us(lambda: F.linear(x, next(it)))
                torch.backends.cuda.preferred_blas_library(prev)
                line.append(f"{other} {alt:7.1f}")
            except Exception as exc:  # backend not built in
                line.append(f"alt n/a ({type(exc).__name__})")
            ref = F.linear(x, ws[0]).float()
            for cfg in CONFIGS:
                y = triton_linear(x, ws[0], cfg).float()
                err = float((y - ref).norm() / ref.norm())
                t = _us(lambda: triton_linear(x, next(it), cfg))
                line.append(f"{cfg}: {t:7.1f}{'' if err < 1e-2 else f' ERR {err:.1e}'}")
            print("  ".join(line), flush=True)
            del ws


if __name__ == "__main__":
    main()

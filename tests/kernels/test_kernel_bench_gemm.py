"""The probe GEMM of kernels/bench_decode_gemm.py computes x @ w^T (interpreter on the CPU, fp32)."""
import pytest
import torch

from kernels.bench_decode_gemm import triton_linear


@pytest.mark.parametrize("m,n,k", [(40, 48, 64), (16, 80, 32)])
def test_triton_linear_matches_matmul(m, n, k):
    x, w = torch.randn(m, k), torch.randn(n, k)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y = triton_linear(x.to(dev), w.to(dev), (16, 16, 32, 4, 2)).cpu()
    ref = x.double() @ w.double().T
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-3  # tf32 on a GPU

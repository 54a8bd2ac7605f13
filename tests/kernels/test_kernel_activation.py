"""silu_and_mul and its reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul, silu_and_mul_ref


def test_reference_is_swiglu():
    x = torch.randn(3, 2 * 10, dtype=torch.float64)
    gate, up = x[:, :10], x[:, 10:]
    torch.testing.assert_close(silu_and_mul_ref(x), gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("shape", [(5, 2 * 40), (2, 3, 2 * 1500)])  # ragged; > one column block
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(shape, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype).to(device)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_gpu_bf16_llama_shape():
    x = torch.randn(64, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, atol=1e-2, rtol=1e-2)

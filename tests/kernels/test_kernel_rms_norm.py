"""rms_norm / fused_add_rms_norm and their references."""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

EPS = 1e-6


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    residual = torch.randn(shape, generator=gen).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(device)
    return x, residual, weight


def _hf_llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm.forward, written out.
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_hf_llama_rms_norm(dtype):
    x, residual, weight = _inputs((5, 48), dtype, "cpu")
    assert torch.equal(rms_norm_ref(x, weight, EPS), _hf_llama_rms_norm(x, weight, EPS))
    y, new_res = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(new_res, residual + x)
    assert torch.equal(y, _hf_llama_rms_norm(residual + x, weight, EPS))


@pytest.mark.parametrize("shape", [(7, 48), (2, 3, 64)])  # hidden not a power of two; 3-D input
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(shape, dtype, device):
    x, residual, weight = _inputs(shape, dtype, device)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS),
                               atol=tol, rtol=tol)
    y, new_res = fused_add_rms_norm(x, residual, weight, EPS)
    y_ref, new_res_ref = fused_add_rms_norm_ref(x, residual, weight, EPS)
    torch.testing.assert_close(new_res, new_res_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemma_norm_rounds_once_like_hf(dtype):
    """GemmaRMSNorm equals HF's Gemma3RMSNorm bit for bit: (1 + w) times the float32 normalised
    value, rounded once (the Llama rounding would differ in the low bits in half precision)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from framework.models.gemma3 import GemmaRMSNorm
    x, _, _ = _inputs((64, 96), dtype, "cpu")
    hf, ours = Gemma3RMSNorm(96, eps=EPS), GemmaRMSNorm(96, EPS)
    torch.nn.init.normal_(hf.weight, std=0.5)
    ours.weight.data.copy_(hf.weight.data.to(dtype))
    hf = hf.to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), hf(x))
        assert not torch.equal(rms_norm_ref(x, ours.weight.float() + 1, EPS), hf(x))  # the Llama rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_unrounded_matches_reference(dtype, device):
    x, residual, weight = _inputs((7, 48), dtype, device)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(rms_norm(x, weight, EPS, round_normed=False),
                               rms_norm_ref(x, weight, EPS, round_normed=False), atol=tol, rtol=tol)
    y, _ = fused_add_rms_norm(x, residual, weight, EPS, round_normed=False)
    torch.testing.assert_close(y, fused_add_rms_norm_ref(x, residual, weight, EPS, round_normed=False)[0],
                               atol=tol, rtol=tol)


def test_triton_strided_rows(device):
    # Rows with a stride (a column slice of a wider buffer) must not be read as contiguous.
    x, residual, weight = _inputs((6, 80), torch.float32, device)
    xs, rs = x[:, :48], residual[:, :48]
    torch.testing.assert_close(rms_norm(xs, weight[:48], EPS), rms_norm_ref(xs, weight[:48], EPS))
    y, r = fused_add_rms_norm(xs, rs, weight[:48], EPS)
    y_ref, r_ref = fused_add_rms_norm_ref(xs, rs, weight[:48], EPS)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(r, r_ref)


@pytest.mark.gpu
def test_gpu_bf16_llama_shape():
    x, residual, weight = _inputs((257, 4096), torch.bfloat16, "cuda")
    torch.testing.assert_close(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS),
                               atol=1e-2, rtol=1e-2)
    y, r = fused_add_rms_norm(x, residual, weight, EPS)
    y_ref, r_ref = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(r, r_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)

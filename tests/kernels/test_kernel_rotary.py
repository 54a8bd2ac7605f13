"""apply_rotary and its reference."""

from __future__ import annotations

import pytest
import torch

from kernels.rotary import apply_rotary, apply_rotary_ref


def _tables(max_pos: int, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def _inputs(dtype: torch.dtype, device: str, tokens: int = 6, hq: int = 4, hkv: int = 2,
            dim: int = 16):
    gen = torch.Generator().manual_seed(0)
    # q and k as strided views of one fused QKV buffer, as the attention layer produces them.
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen).to(dtype).to(device)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    k = qkv[:, hq * dim: (hq + hkv) * dim].view(tokens, hkv, dim)
    positions = torch.tensor([0, 5, 3, 31, 1, 17][:tokens], device=device)
    cos, sin = _tables(32, dim)
    return q, k, positions, cos.to(device), sin.to(device)


def _hf_rotate_half_f64(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, full-width tables.
    c = torch.cat([cos, cos], dim=-1)[positions].double().unsqueeze(1)
    s = torch.cat([sin, sin], dim=-1)[positions].double().unsqueeze(1)
    x = x.double()
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


def test_reference_matches_hf_rotate_half():
    q, k, positions, cos, sin = _inputs(torch.float32, "cpu")
    q_out, k_out = apply_rotary_ref(q, k, positions, cos, sin)
    torch.testing.assert_close(q_out.double(), _hf_rotate_half_f64(q, positions, cos, sin))
    torch.testing.assert_close(k_out.double(), _hf_rotate_half_f64(k, positions, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_and_leaves_inputs(dtype, device):
    q, k, positions, cos, sin = _inputs(dtype, device)
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = apply_rotary(q, k, positions, cos, sin)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(q_out, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_out, k_ref, atol=tol, rtol=tol)
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # out of place, both versions


def test_triton_non_power_of_two_heads(device):
    q, k, positions, cos, sin = _inputs(torch.float32, device, hq=6, hkv=3, dim=24)
    for got, want in zip(apply_rotary(q, k, positions, cos, sin),
                         apply_rotary_ref(q, k, positions, cos, sin)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_gpu_bf16_llama_shape():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(513, 32, 128, generator=gen).to(torch.bfloat16).cuda()
    k = torch.randn(513, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    positions = torch.randint(0, 4096, (513,), generator=gen).cuda()
    cos, sin = (t.cuda() for t in _tables(4096, 128, base=500000.0))
    for got, want in zip(apply_rotary(q, k, positions, cos, sin),
                         apply_rotary_ref(q, k, positions, cos, sin)):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)

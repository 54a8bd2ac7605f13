"""The dispatch rule in kernels/__init__.py: Triton on CUDA or when forced, torch otherwise."""

from __future__ import annotations

import sys

import pytest
import torch

import kernels
from kernels.activation import silu_and_mul_ref
from kernels.kv_cache import slot_rows
from kernels.attention import paged_attention_ref, paged_decode_attention_ref
from kernels.rotary import apply_rotary_ref
from kernels.rms_norm import rms_norm_ref

# `kernels.rms_norm` is the dispatching op, which shadows the submodule of the same name as a
# package attribute; the module itself is reached through sys.modules / from-imports.
NORM_MODULE = sys.modules["kernels.rms_norm"]


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(NORM_MODULE, "rms_norm", lambda *a: calls.append("triton"))
    monkeypatch.setattr(NORM_MODULE, "rms_norm_ref", lambda *a: calls.append("ref"))
    return calls


def test_cpu_tensor_runs_reference(spies, monkeypatch):
    monkeypatch.delenv("KERNELS_FORCE_TRITON", raising=False)
    kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
    assert spies == ["ref"]


def test_force_needs_the_interpreter(spies, monkeypatch):
    monkeypatch.setenv("KERNELS_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
    assert spies == ["ref", "triton"]


@pytest.mark.parametrize("forced", [False, True])
def test_every_public_op_through_the_package(forced, monkeypatch, paged_batch, device):
    # The package wrappers must pass arguments through correctly on both paths.
    if forced:
        monkeypatch.setenv("KERNELS_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("KERNELS_FORCE_TRITON", raising=False)
    x = torch.randn(3, 16, device=device)
    w = torch.ones(16, device=device)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    y, r = kernels.fused_add_rms_norm(x, x, w, 1e-6)
    torch.testing.assert_close(r, 2 * x)
    torch.testing.assert_close(y, rms_norm_ref(2 * x, w, 1e-6))
    gu = torch.randn(3, 32, device=device)
    torch.testing.assert_close(kernels.silu_and_mul(gu), silu_and_mul_ref(gu))

    batch = paged_batch([(4, 9), (1, 6)], 4, 2, head_dim=16, block_size=4, seed=20)
    attn_args = (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
                 batch.block_tables, batch.scale)
    torch.testing.assert_close(kernels.paged_attention(*attn_args), paged_attention_ref(*attn_args),
                               atol=2e-5, rtol=2e-5)
    dec = paged_batch([(1, 9), (1, 6)], 4, 2, head_dim=16, block_size=4, seed=21)
    dec_args = (dec.q, dec.k_cache, dec.v_cache, dec.seq_lens, dec.block_tables, dec.scale)
    torch.testing.assert_close(kernels.paged_decode_attention(*dec_args, num_splits=2),
                               paged_decode_attention_ref(*dec_args), atol=2e-5, rtol=2e-5)

    positions = torch.tensor([0, 3, 1, 2, 7], device=device)
    cos, sin = torch.rand(8, 8, device=device), torch.rand(8, 8, device=device)
    for got, want in zip(kernels.apply_rotary(batch.q, batch.q[:, :2], positions, cos, sin),
                         apply_rotary_ref(batch.q, batch.q[:, :2], positions, cos, sin)):
        torch.testing.assert_close(got, want)

    k_cache, v_cache = torch.zeros_like(batch.k_cache), torch.zeros_like(batch.v_cache)
    slots = torch.tensor([3, -1, 0, 9, 5], device=device)
    kernels.store_kv_cache(batch.q[:, :2], batch.q[:, 2:], k_cache, v_cache, slots)
    assert torch.equal(slot_rows(k_cache)[9], batch.q[3, :2])
    assert torch.equal(slot_rows(v_cache)[5], batch.q[4, 2:])


def test_public_names():
    for name in ("store_kv_cache", "paged_attention", "paged_decode_attention", "rms_norm",
                 "fused_add_rms_norm", "apply_rotary", "silu_and_mul"):
        assert callable(getattr(kernels, name)), name


def test_programmatic_dependent_launch_keywords():
    from kernels import _triton
    # CPU tensors (and the interpreter) never launch with it; the constexpr is always passed
    assert _triton.pdl(torch.device("cpu")) == {"PDL": False}
    if torch.cuda.is_available() and _triton.pdl_supported(0):
        assert _triton.pdl(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
        _triton.set_pdl(False)
        try:
            assert _triton.pdl(torch.device("cuda", 0)) == {"PDL": False}
        finally:
            _triton.set_pdl(True)

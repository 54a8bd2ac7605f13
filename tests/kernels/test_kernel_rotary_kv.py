"""rotary_store_kv (rotary + KV-cache write in one kernel) against apply_rotary then store_kv_cache."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.kv_cache import slot_rows, store_kv_cache, store_kv_cache_ref
from kernels.rotary import apply_rotary, apply_rotary_ref
from kernels.rotary_kv import rotary_store_kv, rotary_store_kv_ref

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _tables(max_pos: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos().to(device), freqs.sin().to(device)


def _case(dtype: torch.dtype, device: str, tokens: int = 9, hq: int = 4, hkv: int = 2, dim: int = 16,
          cache_dtype: torch.dtype | None = None, seed: int = 0) -> dict:
    """q/k/v as strided views of one fused QKV buffer (as the attention layer gets them), a
    NaN-filled paged cache, and slots in shuffled order with two padding rows (-1)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    num_blocks, block_size = tokens // 4 + 3, 4
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[1, tokens - 2]] = -1
    # Built in float32 and cast: NaN survives into fp8 (both formats have one), and any slot a
    # kernel writes by mistake stops being NaN.
    cache = torch.full((num_blocks, hkv, block_size, dim), float("nan")).to(cache_dtype or dtype).to(device)
    cos, sin = _tables(32, dim, device)
    return dict(q=q.view(tokens, hq, dim), k=k.view(tokens, hkv, dim), v=v.view(tokens, hkv, dim),
                positions=torch.randint(0, 32, (tokens,), generator=gen).to(device), cos=cos, sin=sin,
                k_cache=cache, v_cache=cache.clone(), slot_mapping=slots.to(device))


def _run(fn, c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fn on fresh copies of the caches; returns (q_out, k_cache, v_cache)."""
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    q_out = fn(c["q"], c["k"], c["v"], c["positions"], c["cos"], c["sin"], k_cache, v_cache, c["slot_mapping"])
    return q_out, k_cache, v_cache


def _two_kernels(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """The path the fused kernel replaces, in Triton."""
    q, k = apply_rotary(q, k, positions, cos, sin)
    store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """For bitwise comparison: torch.equal on the bytes treats equal NaNs as equal."""
    return x.view(torch.uint8)


def test_reference_is_the_composition():
    c = _case(torch.float32, "cpu")
    q_out, k_cache, v_cache = _run(rotary_store_kv_ref, c)
    q_rot, k_rot = apply_rotary_ref(c["q"], c["k"], c["positions"], c["cos"], c["sin"])
    k_want, v_want = c["k_cache"].clone(), c["v_cache"].clone()
    store_kv_cache_ref(k_rot, c["v"], k_want, v_want, c["slot_mapping"])
    assert torch.equal(q_out, q_rot)
    torch.testing.assert_close(k_cache, k_want, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_want, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("hq,hkv,dim", [(4, 2, 16), (6, 3, 24), (2, 2, 8)])  # GQA, odd sizes, MHA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_composed_references(dtype, hq, hkv, dim, device):
    c = _case(dtype, device, hq=hq, hkv=hkv, dim=dim)
    inputs = {name: c[name].clone() for name in ("q", "k", "v")}
    q_out, k_cache, v_cache = _run(rotary_store_kv, c)
    q_ref, k_ref, v_ref = _run(rotary_store_kv_ref, c)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert q_out.dtype == dtype and q_out.shape == c["q"].shape
    torch.testing.assert_close(q_out, q_ref, atol=tol, rtol=tol)
    # equal_nan: the slots nobody maps (and the -1 rows' would-be slots) stay NaN in both
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, atol=tol, rtol=tol)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, atol=0, rtol=0)
    written = ~slot_rows(k_cache).isnan().all(-1).all(-1)
    assert written.sum() == (c["slot_mapping"] >= 0).sum()  # the test's NaN check has teeth
    for name, before in inputs.items():
        assert torch.equal(c[name], before), f"{name} was modified"


@pytest.mark.parametrize("cache_dtype", FP8)
def test_fp8_cache_holds_what_the_two_kernels_write(cache_dtype, device):
    # fp16 k rotated in fp32 must round to fp16 and only then to fp8, as apply_rotary's output
    # does before store_kv_cache casts it; one direct rounding differs on a few of these values.
    c = _case(torch.float16, device, tokens=64, hq=2, hkv=2, dim=16, cache_dtype=cache_dtype, seed=1)
    q_out, k_cache, v_cache = _run(rotary_store_kv, c)
    q_two, k_two, v_two = _run(_two_kernels, c)
    assert torch.equal(q_out, q_two)
    assert torch.equal(_bytes(k_cache), _bytes(k_two))
    assert torch.equal(_bytes(v_cache), _bytes(v_two))


def test_no_tokens(device):
    c = _case(torch.float32, device, tokens=9)
    c.update(q=c["q"][:0], k=c["k"][:0], v=c["v"][:0], positions=c["positions"][:0],
             slot_mapping=c["slot_mapping"][:0])
    q_out, k_cache, _ = _run(rotary_store_kv, c)
    assert q_out.shape == (0, 4, 16) and k_cache.isnan().all()


@pytest.mark.parametrize("forced", [False, True])
def test_dispatching_op(forced, monkeypatch, device):
    if forced:
        monkeypatch.setenv("KERNELS_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("KERNELS_FORCE_TRITON", raising=False)
    c = _case(torch.float32, device)
    q_out, k_cache, v_cache = _run(kernels.rotary_store_kv, c)
    q_ref, k_ref, v_ref = _run(rotary_store_kv_ref, c)
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, atol=0, rtol=0)
    assert "rotary_store_kv" in kernels.__all__


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 513])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, *FP8])
def test_gpu_bf16_llama_shape(cache_dtype, tokens):
    c = _case(torch.bfloat16, "cuda", tokens=tokens + 2, hq=32, hkv=8, dim=128, cache_dtype=cache_dtype)
    c["cos"], c["sin"] = _tables(4096, 128, "cuda")
    c["positions"] = torch.randint(0, 4096, (tokens + 2,), device="cuda")
    q_out, k_cache, v_cache = _run(rotary_store_kv, c)
    q_ref, k_ref, v_ref = _run(rotary_store_kv_ref, c)
    torch.testing.assert_close(q_out, q_ref, atol=1e-2, rtol=1e-2)
    # bf16 k may differ from torch's in its last bit (FMA), which fp8 can turn into one fp8 step.
    step = {torch.bfloat16: 1e-2, torch.float8_e4m3fn: 0.125, torch.float8_e5m2: 0.25}[cache_dtype]
    torch.testing.assert_close(k_cache.float(), k_ref.float(), equal_nan=True, atol=1e-2, rtol=step)
    assert torch.equal(_bytes(v_cache), _bytes(v_ref))  # a plain cast: exact (NaN bits included)
    # and against the two Triton kernels it replaces, bit for bit
    q_two, k_two, v_two = _run(_two_kernels, c)
    assert torch.equal(q_out, q_two) and torch.equal(_bytes(k_cache), _bytes(k_two))

"""store_kv_cache and its reference."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import slot_rows, store_kv_cache, store_kv_cache_ref


def _case(dtype: torch.dtype, slot_dtype: torch.dtype, device: str, heads: int = 2, dim: int = 24):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, tokens = 5, 4, 9
    # A fused KV buffer: key and value are strided column slices of it, as after a QKV matmul.
    kv = torch.randn(tokens, 2 * heads * dim, generator=gen).to(dtype).to(device)
    key = kv[:, : heads * dim].view(tokens, heads, dim)
    value = kv[:, heads * dim:].view(tokens, heads, dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 6]] = -1  # padding rows
    cache = torch.full((num_blocks, heads, block_size, dim), float("nan"), dtype=dtype, device=device)
    return key, value, cache, cache.clone(), slots.to(slot_dtype).to(device)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(dtype, slot_dtype, device):
    key, value, k_cache, v_cache, slots = _case(dtype, slot_dtype, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache(key, value, k_cache, v_cache, slots)
    store_kv_cache_ref(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, atol=0, rtol=0)


def test_reference_writes_exactly_the_mapped_slots():
    key, value, k_cache, v_cache, slots = _case(torch.float32, torch.int64, "cpu")
    store_kv_cache_ref(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = slot_rows(k_cache), slot_rows(v_cache)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[t]) and torch.equal(flat_v[s], value[t])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("store", [store_kv_cache, store_kv_cache_ref])
def test_layout_is_head_major_per_block(store, device):
    """Slot s of head h lives at cache[s // bs, h, s % bs]: a block's keys of one head are one
    contiguous [bs, D] run, which the decode kernel's reads rely on."""
    key, value, k_cache, v_cache, slots = _case(torch.float32, torch.int64, device)
    store(key, value, k_cache, v_cache, slots)
    block_size = k_cache.shape[2]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            for h in range(key.shape[1]):
                assert torch.equal(k_cache[s // block_size, h, s % block_size], key[t, h])
                assert torch.equal(v_cache[s // block_size, h, s % block_size], value[t, h])


@pytest.mark.gpu
def test_gpu_bf16_large():
    gen = torch.Generator(device="cuda").manual_seed(0)
    key = torch.randn(4096, 8, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(1000 * 16, device="cuda", generator=gen)[:4096]
    slots[::7] = -1
    k_cache = torch.zeros(1000, 8, 16, 128, device="cuda", dtype=torch.bfloat16)
    v_cache, k_ref, v_ref = k_cache.clone(), k_cache.clone(), k_cache.clone()
    store_kv_cache(key, value, k_cache, v_cache, slots)
    store_kv_cache_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)

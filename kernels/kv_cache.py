"""Write new tokens' K/V into the paged cache; slot -1 marks a padding row to skip.

Cache layout (per layer): `[num_blocks, num_kv_heads, block_size, head_dim]`, contiguous. A
token's slot `block_id * block_size + offset` names one row in each head's block. Heads are outer
to tokens so that the decode kernel, which reads one KV head of a sequence, finds each block's keys
in one contiguous block_size x head_dim run (4 KiB for bf16, 16 x 128) rather than in pieces of
one head_dim strided num_kv_heads apart. The store pays for it with a scatter of num_kv_heads
short rows per token, a small cost against reading every row once per decode step.
Skipping negative slots lets the engine pad a batch (CUDA graphs) without a scratch block.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton


@triton.jit
def cache_offsets(slot, h, d, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Element offsets of (slot, head h, dim d) in a contiguous [blocks, heads, block_size, dim] cache."""
    block = slot // BLOCK_SIZE
    return ((block * NUM_HEADS + h) * BLOCK_SIZE + slot % BLOCK_SIZE) * HEAD_DIM + d


@triton.jit
def _store_kv_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token: its [heads, head_dim] rows go to one row of each head's block.
    pdl_enter(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    # Strides for key/value: they are usually column slices of the fused QKV output.
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_offsets(slot, h, d, NUM_HEADS, HEAD_DIM, BLOCK_SIZE)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    assert key.dim() == 3 and key.shape == value.shape, "key/value must be [T, Hkv, D]"
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "cache must be [blocks, Hkv, bs, D]"
    assert key.shape[1:] == (k_cache.shape[1], k_cache.shape[3]), "key heads/head_dim must match the cache"
    assert slot_mapping.shape == (key.shape[0],), "slot_mapping must be [T]"
    # A non-contiguous cache would make the kernels' computed offsets wrong (and the torch path write a copy).
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "cache must be contiguous"


def slot_rows(cache: torch.Tensor) -> torch.Tensor:
    """`[num_blocks * block_size, Hkv, D]` copy of a cache, row s holding slot s (tests, debugging)."""
    return cache.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton: `k_cache[slot // bs, :, slot % bs] = key[t]` for every t with slot >= 0, in place."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _store_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_H=next_pow2(num_heads), BLOCK_D=next_pow2(head_dim), **pdl(key.device)
    )


def store_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Torch reference of `store_kv_cache` (same semantics, in place)."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()  # boolean indexing syncs; fine on the CPU backend
    block_size = k_cache.shape[2]
    index = (slots // block_size, slots % block_size)
    for src, cache in ((key, k_cache), (value, v_cache)):
        rows = src[keep].to(cache.dtype)
        if cache.dtype in FP8_DTYPES:  # CPU index_put_ has no fp8 kernel: copy the bytes
            cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
        # [blocks, bs, Hkv, D] view of the same storage: (block, offset) picks a [Hkv, D] row.
        cache.transpose(1, 2).index_put_(index, rows)

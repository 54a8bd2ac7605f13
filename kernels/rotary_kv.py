"""Rotary embedding fused with the KV-cache write: one launch where there were two.

`rotary_store_kv` = `apply_rotary` on q and k, then `store_kv_cache` of the rotated k and v.
In a graph-captured decode step each tiny kernel costs a few microseconds of launch and tail,
so doing both per layer in one program per token saves one launch per layer. The rotated k
never exists as a tensor: it goes straight into the cache, rounded first to k's dtype and only
then to the cache's, so the cache holds exactly what the two separate kernels would have
written (fp8 caches included). q comes back rotated, as a new tensor; the inputs are untouched.

Conventions (rotate_half layout, fp32 cos/sin `[max_pos, head_dim // 2]`, slot -1 = skip, the
cache layout) are those of kernels/rotary.py and kernels/kv_cache.py.
"""

from __future__ import annotations

import torch

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton
from kernels.kv_cache import _check as _check_kv
from kernels.kv_cache import cache_offsets
from kernels.kv_cache import store_kv_cache_ref
from kernels.rotary import _check as _check_rotary
from kernels.rotary import _cos_sin_row, _rotate_heads, apply_rotary_ref


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token: the cos/sin row is loaded once for all of its q and k heads.
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin_row(pos_ptr, cos_ptr, sin_ptr, t, HALF, BLOCK_HALF)
    # q is rotated for every row, padding included (its attention output is simply unused).
    _rotate_heads(q_ptr, q_out_ptr, t, stride_qt, stride_qh, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_HKV)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < HKV) & (d < HALF)
    src = k_ptr + t * stride_kt + h * stride_kh + d
    k1 = tl.load(src, mask=mask, other=0.0)
    k2 = tl.load(src + HALF, mask=mask, other=0.0)
    a = k1.to(tl.float32)
    b = k2.to(tl.float32)
    # k's dtype first (apply_rotary's output), then the cache's (store_kv_cache's cast): one
    # direct fp32 -> fp8 rounding could differ from the two-kernel path in the last bit.
    cache_ty = k_cache_ptr.dtype.element_ty
    dst = cache_offsets(slot, h, d, HKV, 2 * HALF, BLOCK_SIZE)  # each head's row of the slot's block
    tl.store(k_cache_ptr + dst, (a * cos - b * sin).to(k1.dtype).to(cache_ty), mask=mask)
    tl.store(k_cache_ptr + dst + HALF, (b * cos + a * sin).to(k1.dtype).to(cache_ty), mask=mask)
    # v is copied in the same two halves, which reuses the k mask and offsets.
    v_src = v_ptr + t * stride_vt + h * stride_vh + d
    v1 = tl.load(v_src, mask=mask)
    v2 = tl.load(v_src + HALF, mask=mask)
    tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """Triton: rotate q `[T, Hq, D]` (returned, new) and k `[T, Hkv, D]`, and write rotated k and
    v `[T, Hkv, D]` into the caches at `slot_mapping` (-1: skipped), in place."""
    _check_rotary(q, k, positions, cos, sin)
    _check_kv(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    # Rows may be strided (views of the fused QKV output); only the last dim must be dense.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos = cos.contiguous()
    sin = sin.contiguous()
    half = head_dim // 2
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, q_out, positions, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HQ=hq, HKV=hkv, HALF=half, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_HQ=next_pow2(hq), BLOCK_HKV=next_pow2(hkv), BLOCK_HALF=next_pow2(half), **pdl(q.device)
    )
    return q_out


def rotary_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """Torch reference: literally the two references composed, so the CPU backend is unchanged."""
    q, k = apply_rotary_ref(q, k, positions, cos, sin)
    store_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q

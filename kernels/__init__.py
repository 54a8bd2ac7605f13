"""Inference kernels: each op is a Triton kernel with a pure-torch reference beside it.

Dispatch rule (the only one, applied by every op below): run the Triton kernel when the first
tensor argument is on CUDA, or when Triton's CPU interpreter is on (`TRITON_INTERPRET=1`) and
`KERNELS_FORCE_TRITON=1` asks for it (tests); otherwise run the torch reference. CPU code thus
calls the same names as GPU code. Both variables are read at call time. One exception:
`fp8_linear` needs fp8 tensor cores, so it runs its kernels only where `fp8_linear_supported`
(CUDA, compute capability >= 8.9), and its torch reference elsewhere; `int8_linear` likewise
(`int8_linear_supported`: CUDA, enough rows for torch._int_mm).

The per-file names (`kernels.rms_norm.rms_norm`, `..._ref`) are the two implementations;
the names exported here are the dispatching ops the engine calls.
"""

from __future__ import annotations

import os
from importlib import import_module

import torch

# import_module, not `from kernels import rms_norm`: the op defined below shadows the submodule
# of the same name as a package attribute, and a re-import must still get the module.
_act = import_module("kernels.activation")
_attn = import_module("kernels.attention")
_decode = import_module("kernels.decode_attention")
_fp8 = import_module("kernels.fp8_linear")
_gemv = import_module("kernels.gemv")
_int8 = import_module("kernels.int8_linear")
_kv = import_module("kernels.kv_cache")
_norm = import_module("kernels.rms_norm")
_rope = import_module("kernels.rotary")
_rope_kv = import_module("kernels.rotary_kv")


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on `x` should run the Triton kernel (see the module docstring)."""
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("KERNELS_FORCE_TRITON") == "1"


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    fn = _kv.store_kv_cache if use_triton(key) else _kv.store_kv_cache_ref
    fn(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, sliding_window: int = 0,
                    causal_limits: torch.Tensor | None = None) -> torch.Tensor:
    fn = _attn.paged_attention if use_triton(q) else _attn.paged_attention_ref
    return fn(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, out=out,
              sliding_window=sliding_window, causal_limits=causal_limits)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                           num_splits: int | None = None, max_seq_len: int | None = None,
                           out: torch.Tensor | None = None, sliding_window: int = 0) -> torch.Tensor:
    fn = _decode.paged_decode_attention if use_triton(q) else _decode.paged_decode_attention_ref
    return fn(q, k_cache, v_cache, seq_lens, block_tables, scale,
              num_splits=num_splits, max_seq_len=max_seq_len, out=out, sliding_window=sliding_window)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, round_normed: bool = True) -> torch.Tensor:
    return (_norm.rms_norm if use_triton(x) else _norm.rms_norm_ref)(x, weight, eps, round_normed)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, round_normed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _norm.fused_add_rms_norm if use_triton(x) else _norm.fused_add_rms_norm_ref
    return fn(x, residual, weight, eps, round_normed)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns new (q, k); the inputs are not modified (both implementations)."""
    return (_rope.apply_rotary if use_triton(q) else _rope.apply_rotary_ref)(q, k, positions, cos, sin)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """apply_rotary then store_kv_cache of the rotated k and v, in one launch; returns the new q."""
    fn = _rope_kv.rotary_store_kv if use_triton(q) else _rope_kv.rotary_store_kv_ref
    return fn(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return (_act.silu_and_mul if use_triton(x) else _act.silu_and_mul_ref)(x)


GEMV_MAX_ROWS = _gemv.GEMV_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that up to GEMV_MAX_ROWS rows of x (leading dims flattened) against a
    contiguous weight of x's dtype take the Triton GEMV (decode); bigger batches stay on cuBLAS."""
    if not (use_triton(x) and _gemv.supported(x, weight)):
        return _gemv.linear_ref(x, weight, bias)
    y = _gemv.linear_gemv(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_linear_supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `fp8_linear` runs on fp8 tensor cores for x [M, K] and codes [N, K]: bf16/fp16 x on
    a CUDA card of compute capability >= 8.9, K and N multiples of 16 (kernels/fp8_linear.py)."""
    return _fp8.supported(x, codes)


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: x [M, K] quantized per token to fp8, times the fp8 weight [N, K] with row scales
    [N], plus bias -> [M, N] in x.dtype. Triton quantization + torch._scaled_mm where
    `fp8_linear_supported`, else the torch reference (same function, float32 matmul)."""
    fn = _fp8.fp8_linear if _fp8.supported(x, codes) else _fp8.fp8_linear_ref
    return fn(x, codes, scale, bias)


def int8_linear_supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `int8_linear` runs on int8 tensor cores for x [M, K] and codes [N, K]
    (kernels/int8_linear.py: bf16/fp16 on CUDA, at least MIN_ROWS rows, K and N multiples of 8)."""
    return _int8.supported(x, codes)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: x [M, K] quantized per token to int8, times the int8 weight [N, K] with row scales
    [N], plus bias -> [M, N] in x.dtype. Triton quantization + torch._int_mm where
    `int8_linear_supported`, else the torch reference (same function, float32 matmul)."""
    fn = _int8.int8_linear if _int8.supported(x, codes) else _int8.int8_linear_ref
    return fn(x, codes, scale, bias)


__all__ = [
    "GEMV_MAX_ROWS",
    "apply_rotary",
    "fp8_linear",
    "fp8_linear_supported",
    "fused_add_rms_norm",
    "int8_linear",
    "int8_linear_supported",
    "linear",
    "paged_attention",
    "paged_decode_attention",
    "rms_norm",
    "rotary_store_kv",
    "silu_and_mul",
    "store_kv_cache",
    "use_triton",
]

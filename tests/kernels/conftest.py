"""Kernel tests: on a machine without CUDA, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported (Triton decides per `@triton.jit`
function, its standard library included, at decoration time). Setting it in the environment or
in the top-level tests/conftest.py also works, and is needed if a test module collected before
this directory imports triton.
"""

from __future__ import annotations

import os
import sys

import torch

# Triton's own standard library is decorated when triton is first imported, so the interpreter
# only works if the variable is set before that. If a test module collected earlier imported
# triton (say via `framework` -> `kernels`), these tests can't run on the CPU: say so clearly.
TRITON_IMPORTED_TOO_EARLY = False
if not torch.cuda.is_available():
    TRITON_IMPORTED_TOO_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Interpreted tensors live on the CPU; on a GPU machine the same tests run compiled kernels.
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _interpreter_usable() -> None:
    if TRITON_IMPORTED_TOO_EARLY:
        pytest.fail("triton was imported before tests/kernels/conftest.py could set "
                    "TRITON_INTERPRET=1; set it in the environment or in tests/conftest.py")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the dispatching ops in `kernels` pick Triton even for CPU tensors (interpreter)."""
    monkeypatch.setenv("KERNELS_FORCE_TRITON", "1")


@dataclass
class PagedBatch:
    """A mixed batch written into a paged cache, plus the dense K/V it came from."""

    q: torch.Tensor             # [T, Hq, D]
    k_cache: torch.Tensor       # [num_blocks, Hkv, block_size, D], unused slots NaN
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor      # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks], unused entries -1 or junk
    keys: list[torch.Tensor]    # per sequence [seq_len, Hkv, D]
    values: list[torch.Tensor]
    scale: float


def build_paged_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str = DEVICE,
) -> PagedBatch:
    """`seqs` holds (q_len, seq_len) per sequence; blocks are handed out in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for _, s in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN: reading one poisons the result
    max_blocks = max(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.full((num_blocks, num_kv_heads, block_size, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    block_tables = torch.full((len(seqs), max_blocks), -1, dtype=torch.int32)
    block_tables[:, -1] = 10**6  # junk past the used entries must never be dereferenced
    keys, values, qs, cu = [], [], [], [0]
    used = 0
    for b, (q_len, seq_len) in enumerate(seqs):
        assert 0 <= q_len <= seq_len
        ids = perm[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, : len(ids)] = ids.int()
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(seq_len)
        k_cache[ids[pos // block_size], :, pos % block_size] = k  # [seq_len, Hkv, D] rows
        v_cache[ids[pos // block_size], :, pos % block_size] = v
        keys.append(k)
        values.append(v)
        qs.append(torch.randn(q_len, num_heads, head_dim, generator=gen).to(dtype))
        cu.append(cu[-1] + q_len)
    to = dict(device=device)
    return PagedBatch(
        q=torch.cat(qs).to(**to),
        k_cache=k_cache.to(**to),
        v_cache=v_cache.to(**to),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32, device=device),
        block_tables=block_tables.to(**to),
        keys=keys,
        values=values,
        scale=head_dim**-0.5,
    )


def dense_causal_attention_f64(batch: PagedBatch, window: int = 0) -> torch.Tensor:
    """The spec, computed directly in float64 from the dense K/V: no paging, no SDPA.
    `window` > 0: position p sees keys p - window < n <= p (HF's sliding-window mask)."""
    q = batch.q.double().cpu()
    out = torch.zeros_like(q)
    cu = batch.cu_seqlens_q.tolist()
    hq, hkv = q.shape[1], batch.keys[0].shape[1]
    for b, (k, v) in enumerate(zip(batch.keys, batch.values)):
        start, end = cu[b], cu[b + 1]
        q_len, seq_len = end - start, k.shape[0]
        for i in range(q_len):
            p = seq_len - q_len + i  # absolute position of this query token
            lo = max(0, p - window + 1) if window else 0
            for h in range(hq):
                kh = h // (hq // hkv)
                s = (k[lo: p + 1, kh].double() @ q[start + i, h]) * batch.scale
                w = torch.softmax(s, dim=0)
                out[start + i, h] = w @ v[lo: p + 1, kh].double()
    return out


@pytest.fixture
def paged_batch() -> Callable[..., PagedBatch]:
    return build_paged_batch


@pytest.fixture
def dense_reference() -> Callable[[PagedBatch], torch.Tensor]:
    return dense_causal_attention_f64

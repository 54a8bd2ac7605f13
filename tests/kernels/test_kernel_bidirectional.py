"""Bidirectional runs (Gemma-3's image tokens) in the paged prefill kernel and its reference:
a token inside a run sees keys up to the run's last position, every other token is causal, and
a sliding window still cuts keys older than p - W + 1 (HF: window AND (causal OR same image))."""

from __future__ import annotations

import pytest
import torch

from kernels import attention
from kernels.attention import paged_attention, paged_attention_ref

# (q_len, seq_len): a whole prompt, chunks after earlier context, a decode, a short prefill
MIXED = [(20, 20), (13, 37), (1, 23), (12, 30), (3, 5)]
# runs [start, end) in absolute positions of each sequence, inside its new tokens
RUNS = [[(2, 9), (12, 13), (15, 20)], [(24, 31), (33, 37)], [], [(18, 29)], [(2, 4)]]
WINDOW = 7


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "BLOCK_M", 16)
    monkeypatch.setattr(attention, "BLOCK_N", 16)


def causal_limits(batch, runs) -> torch.Tensor:
    cu, lens = batch.cu_seqlens_q.tolist(), batch.seq_lens.tolist()
    out = []
    for b, seq_len in enumerate(lens):
        first = seq_len - (cu[b + 1] - cu[b])
        limits = list(range(first, seq_len))
        for start, end in runs[b]:
            assert first <= start and end <= seq_len, "a run lies in the step's new tokens"
            limits[start - first:end - first] = [end - 1] * (end - start)
        out += limits
    return torch.tensor(out, dtype=torch.int32, device=batch.q.device)


def dense_reference(batch, limits: torch.Tensor, window: int = 0) -> torch.Tensor:
    """The spec in float64 from the dense K/V: key n visible from p iff n <= limit[p] and
    (no window or n > p - window)."""
    q = batch.q.double().cpu()
    out = torch.zeros_like(q)
    cu = batch.cu_seqlens_q.tolist()
    hq, hkv = q.shape[1], batch.keys[0].shape[1]
    limits = limits.tolist()
    for b, (k, v) in enumerate(zip(batch.keys, batch.values)):
        start, end = cu[b], cu[b + 1]
        seq_len = k.shape[0]
        for i in range(end - start):
            p = seq_len - (end - start) + i
            lo, hi = (max(0, p - window + 1) if window else 0), limits[start + i] + 1
            for h in range(hq):
                kh = h // (hq // hkv)
                w = torch.softmax((k[lo:hi, kh].double() @ q[start + i, h]) * batch.scale, dim=0)
                out[start + i, h] = w @ v[lo:hi, kh].double()
    return out


def _args(batch):
    return (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)


@pytest.mark.parametrize("window", [0, WINDOW], ids=["full", "window"])
def test_reference_matches_dense_float64(paged_batch, window, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)  # runs cross the reference's query chunks
    batch = paged_batch(MIXED, 4, 2, head_dim=16, block_size=4, seed=31, device="cpu")
    limits = causal_limits(batch, RUNS)
    out = paged_attention_ref(*_args(batch), sliding_window=window, causal_limits=limits)
    torch.testing.assert_close(out.double(), dense_reference(batch, limits, window), atol=2e-5, rtol=2e-5)
    causal = paged_attention_ref(*_args(batch), sliding_window=window)
    assert not torch.allclose(out, causal, atol=1e-3)  # the runs change the answer


@pytest.mark.parametrize("heads", [(4, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, WINDOW], ids=["full", "window"])
def test_triton_prefill_matches_reference(heads, dtype, window, small_tiles, paged_batch):
    """Tiles of 16 rows (8 tokens x 2 grouped heads or 2 x 8): runs straddle tiles, and a tile's
    keys reach past its last token to its rows' largest limit."""
    batch = paged_batch(MIXED, *heads, head_dim=16, block_size=4, dtype=dtype, seed=32)
    limits = causal_limits(batch, RUNS)
    out = torch.full_like(batch.q, float("nan"))
    paged_attention(*_args(batch), out=out, sliding_window=window, causal_limits=limits)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    ref = paged_attention_ref(*_args(batch), sliding_window=window, causal_limits=limits)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), dense_reference(batch, limits, window), atol=2e-5, rtol=2e-5)


def test_limits_at_each_position_are_plain_causal(small_tiles, paged_batch):
    batch = paged_batch(MIXED, 4, 2, head_dim=16, block_size=4, seed=33)
    own = causal_limits(batch, [[] for _ in MIXED])
    with_limits = paged_attention(*_args(batch), causal_limits=own)
    torch.testing.assert_close(with_limits, paged_attention(*_args(batch)), atol=0, rtol=0)

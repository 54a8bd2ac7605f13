"""Sliding-window attention (Gemma-3's local layers) in both paged kernels and their references:
position p sees keys p - W < n <= p, and blocks before every query's window are never read
(a window layer may have freed them: here they hold NaN and their table entries -1)."""

from __future__ import annotations

import pytest
import torch

from kernels import attention, decode_attention
from kernels.attention import paged_attention, paged_attention_ref
from kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref

WINDOW = 7  # not a multiple of the block size (4) nor of the tiles (16)
# (q_len, seq_len): prefill past the window, chunks whose first query's window reaches back into
# earlier chunks, decodes inside and past the window.
MIXED = [(20, 20), (5, 37), (1, 23), (1, 3), (12, 30), (1, 40), (3, 5)]
DECODE_LENS = [1, 7, 8, 37, 100, 64]


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "BLOCK_M", 16)
    monkeypatch.setattr(attention, "BLOCK_N", 16)
    monkeypatch.setattr(decode_attention, "BLOCK_N", 16)
    monkeypatch.setattr(decode_attention, "SPLIT_BLOCK_N", 16)


def free_blocks_before_window(batch, window: int) -> None:
    """What a window layer's block manager may do: blocks wholly before the first query's window
    are given back (table entry -1) and may be rewritten (NaN)."""
    block_size = batch.k_cache.shape[2]
    cu, lens = batch.cu_seqlens_q.tolist(), batch.seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        first_query = seq_len - (cu[b + 1] - cu[b])
        first_key = max(0, first_query - window + 1)
        for i in range(first_key // block_size):
            blk = int(batch.block_tables[b, i])
            batch.k_cache[blk] = float("nan")
            batch.v_cache[blk] = float("nan")
            batch.block_tables[b, i] = -1


def _args(batch):
    return (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)


def _decode_args(batch):
    return (batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, batch.scale)


def test_reference_matches_dense_float64(paged_batch, dense_reference):
    batch = paged_batch(MIXED, 4, 2, head_dim=16, block_size=4, seed=21, device="cpu")
    free_blocks_before_window(batch, WINDOW)
    out = paged_attention_ref(*_args(batch), sliding_window=WINDOW)
    torch.testing.assert_close(out.double(), dense_reference(batch, WINDOW), atol=2e-5, rtol=2e-5)
    # the window changes the answer: full attention differs on rows past it
    assert not torch.allclose(out.double(), dense_reference(batch), atol=1e-3)


def test_reference_in_query_chunks(paged_batch, dense_reference, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    batch = paged_batch(MIXED, 4, 2, head_dim=16, block_size=4, seed=22, device="cpu")
    free_blocks_before_window(batch, WINDOW)
    out = paged_attention_ref(*_args(batch), sliding_window=WINDOW)
    torch.testing.assert_close(out.double(), dense_reference(batch, WINDOW), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_prefill_matches_reference(heads, dtype, small_tiles, paged_batch, dense_reference):
    batch = paged_batch(MIXED, *heads, head_dim=16, block_size=4, dtype=dtype, seed=23)
    free_blocks_before_window(batch, WINDOW)
    out = torch.full_like(batch.q, float("nan"))
    paged_attention(*_args(batch), out=out, sliding_window=WINDOW)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, paged_attention_ref(*_args(batch), sliding_window=WINDOW), atol=tol, rtol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), dense_reference(batch, WINDOW), atol=2e-5, rtol=2e-5)


def test_triton_prefill_window_wider_than_a_tile(paged_batch, dense_reference):
    """Default tiles; a 40-key window over a 100-token chunk after a 90-token prefix."""
    batch = paged_batch([(100, 190), (1, 65), (30, 30)], 4, 2, head_dim=32, block_size=16, seed=24)
    free_blocks_before_window(batch, 40)
    out = paged_attention(*_args(batch), sliding_window=40)
    torch.testing.assert_close(out.double().cpu(), dense_reference(batch, 40), atol=2e-5, rtol=2e-5)


def test_decode_reference_matches_dense_float64(paged_batch, dense_reference):
    batch = paged_batch([(1, n) for n in DECODE_LENS], 6, 2, head_dim=16, block_size=4, seed=25, device="cpu")
    free_blocks_before_window(batch, WINDOW)
    out = paged_decode_attention_ref(*_decode_args(batch), sliding_window=WINDOW)
    torch.testing.assert_close(out.double(), dense_reference(batch, WINDOW), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("window", [WINDOW, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_decode_split_k_matches_reference(num_splits, window, dtype, small_tiles, paged_batch):
    batch = paged_batch([(1, n) for n in DECODE_LENS], 4, 2, head_dim=16, block_size=4, dtype=dtype, seed=26)
    free_blocks_before_window(batch, window)
    out = torch.full_like(batch.q, float("nan"))
    paged_decode_attention(*_decode_args(batch), num_splits=num_splits, out=out, sliding_window=window)
    ref = paged_decode_attention_ref(*_decode_args(batch), sliding_window=window)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_decode_and_mixed_references_agree(paged_batch):
    batch = paged_batch([(1, n) for n in DECODE_LENS], 4, 2, head_dim=16, block_size=4, seed=27, device="cpu")
    free_blocks_before_window(batch, WINDOW)
    torch.testing.assert_close(paged_decode_attention_ref(*_decode_args(batch), sliding_window=WINDOW),
                               paged_attention_ref(*_args(batch), sliding_window=WINDOW), atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 256])  # Gemma-3-27B's, and the 4B/12B's
def test_gpu_bf16_gemma_shapes(head_dim, paged_batch):
    """Gemma-3-27B's heads (32 query, 16 KV) and window (1024) over contexts past it."""
    seqs = [(1500, 1500), (300, 2600), (1, 1025), (1, 3000), (17, 17)] + [(1, 700)] * 6
    batch = paged_batch(seqs, 32, 16, head_dim=head_dim, block_size=16, dtype=torch.bfloat16, seed=28, device="cuda")
    free_blocks_before_window(batch, 1024)
    out = paged_attention(*_args(batch), sliding_window=1024)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, paged_attention_ref(*_args(batch), sliding_window=1024), atol=2e-2, rtol=2e-2)
    decode = paged_batch([(1, n) for n in (1, 1024, 1025, 3000, 40)], 32, 16, head_dim=head_dim, block_size=16,
                         dtype=torch.bfloat16, seed=29, device="cuda")
    free_blocks_before_window(decode, 1024)
    ref = paged_decode_attention_ref(*_decode_args(decode), sliding_window=1024)
    for splits in (1, 4, None):
        torch.testing.assert_close(paged_decode_attention(*_decode_args(decode), num_splits=splits,
                                                          sliding_window=1024), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_window(paged_batch):
    batch = paged_batch([(1, n) for n in (40, 90, 3)], 8, 2, head_dim=128, block_size=16,
                        dtype=torch.bfloat16, seed=30, device="cuda")
    out = torch.empty_like(batch.q)
    args = _decode_args(batch)
    paged_decode_attention(*args, out=out, max_seq_len=128, sliding_window=32)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args, out=out, max_seq_len=128, sliding_window=32)
    batch.seq_lens[1] = 80  # new lengths after capture: the window moves with them on the device
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out, paged_decode_attention_ref(*args, sliding_window=32), atol=2e-2, rtol=2e-2)

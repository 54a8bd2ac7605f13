"""paged_decode_attention (split-K) and its reference."""

from __future__ import annotations

import pytest
import torch

from kernels import _triton, decode_attention
from kernels.attention import paged_attention_ref
from kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref

# Context lengths: 1, block-aligned, ragged, and long enough for several tiles per split.
LENS = [1, 16, 37, 100, 7, 64]


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "BLOCK_N", 16)  # tl.dot's minimum K on GPU
    monkeypatch.setattr(decode_attention, "SPLIT_BLOCK_N", 16)


def _decode_args(batch):
    return (batch.q, batch.k_cache, batch.v_cache, batch.seq_lens, batch.block_tables, batch.scale)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
def test_reference_matches_dense_float64(heads, paged_batch, dense_reference):
    batch = paged_batch([(1, n) for n in LENS], *heads, head_dim=16, block_size=4, seed=10,
                        device="cpu")
    out = paged_decode_attention_ref(*_decode_args(batch))
    torch.testing.assert_close(out.double(), dense_reference(batch), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 3, 4, None])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_split_k_matches_reference(num_splits, heads, dtype, small_tiles, paged_batch):
    batch = paged_batch([(1, n) for n in LENS], *heads, head_dim=16, block_size=4, dtype=dtype,
                        seed=11)
    out = torch.full_like(batch.q, float("nan"))
    paged_decode_attention(*_decode_args(batch), num_splits=num_splits, out=out)
    ref = paged_decode_attention_ref(*_decode_args(batch))
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_more_splits_than_tiles_and_max_seq_len_hint(small_tiles, paged_batch):
    # 16 splits over at most 13 tiles: trailing chunks are empty and must merge as no-ops.
    batch = paged_batch([(1, n) for n in LENS], 4, 2, head_dim=16, block_size=4, seed=12)
    ref = paged_decode_attention_ref(*_decode_args(batch))
    for kwargs in ({"num_splits": 16}, {"max_seq_len": 100}, {}, {"num_splits": 16}):
        torch.testing.assert_close(paged_decode_attention(*_decode_args(batch), **kwargs), ref,
                                   atol=2e-5, rtol=2e-5)


def test_split_merge_tickets_are_zero_after_each_call(small_tiles, paged_batch):
    # The last split of each (sequence, KV head) merges and resets its counter; a counter left
    # non-zero would make the next call merge early (or never).
    batch = paged_batch([(1, n) for n in LENS], 4, 2, head_dim=16, block_size=4, seed=14)
    ref = paged_decode_attention_ref(*_decode_args(batch))
    for num_splits in (2, 5, 5):
        torch.testing.assert_close(paged_decode_attention(*_decode_args(batch), num_splits=num_splits), ref,
                                   atol=2e-5, rtol=2e-5)
        assert not _triton._TICKETS[batch.q.device].any()


def test_same_as_mixed_kernel_reference(paged_batch):
    # A pure-decode batch through the varlen reference must give the same answer.
    batch = paged_batch([(1, n) for n in LENS], 6, 2, head_dim=16, block_size=4, seed=13)
    mixed = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q,
                                batch.seq_lens, batch.block_tables, batch.scale)
    torch.testing.assert_close(paged_decode_attention(*_decode_args(batch), num_splits=2), mixed,
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_zero_length_sequence_gives_zeros(num_splits, paged_batch):
    # A padded batch entry (e.g. CUDA-graph padding) may carry seq_len 0: no NaN, just zeros.
    batch = paged_batch([(1, 5), (1, 9)], 4, 2, head_dim=16, block_size=4, seed=14)
    batch.seq_lens[1] = 0
    for fn in (paged_decode_attention, paged_decode_attention_ref):
        out = fn(*_decode_args(batch), num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out[0]).all()


def test_pick_num_splits_uses_only_python_ints():
    cpu = torch.device("cpu")
    assert decode_attention.pick_num_splits(1, 8, 100, cpu) == 1  # short context: no split
    assert decode_attention.pick_num_splits(1, 1, 8192, cpu) == 16  # 2 * 8 "SMs" on CPU
    assert decode_attention.pick_num_splits(256, 8, 8192, cpu) == 1  # plenty of programs


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_gpu_bf16_realistic(batch_size, paged_batch):
    gen = torch.Generator().manual_seed(batch_size)
    lens = torch.randint(1, 4000, (batch_size,), generator=gen).tolist()
    batch = paged_batch([(1, n) for n in lens], 32, 8, head_dim=128, block_size=16,
                        dtype=torch.bfloat16, seed=15, device="cuda")
    out = paged_decode_attention(*_decode_args(batch), max_seq_len=4096)
    torch.testing.assert_close(out, paged_decode_attention_ref(*_decode_args(batch)),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(paged_batch):
    batch = paged_batch([(1, n) for n in (300, 2000, 5)], 32, 8, head_dim=128, block_size=16,
                        dtype=torch.bfloat16, seed=16, device="cuda")
    out = torch.empty_like(batch.q)
    paged_decode_attention(*_decode_args(batch), max_seq_len=2048, out=out)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*_decode_args(batch), max_seq_len=2048, out=out)
    for lens in ([299, 1500, 1], [300, 1501, 2], [1, 2000, 5]):  # each replay merges and resets
        batch.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        out.zero_()
        graph.replay()
        torch.testing.assert_close(out, paged_decode_attention_ref(*_decode_args(batch)),
                                   atol=2e-2, rtol=2e-2)
    assert not _triton._TICKETS[batch.q.device].any()

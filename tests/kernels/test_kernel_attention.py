"""paged_attention (mixed prefill / chunked prefill / decode) and its reference."""

from __future__ import annotations

import pytest
import torch

from kernels import attention
from kernels.attention import paged_attention, paged_attention_ref

# (q_len, seq_len): full prefill, chunked prefill over a cached prefix, decodes, an idle slot.
MIXED = [(9, 9), (5, 37), (1, 23), (1, 1), (0, 4), (12, 30), (1, 40)]
HEADS = [(4, 4), (4, 2), (6, 2), (8, 1)]  # MHA, GQA 2, GQA 3 (non power of two), MQA


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny tiles so that tiny shapes still cross several query and key tiles."""
    monkeypatch.setattr(attention, "BLOCK_M", 16)
    monkeypatch.setattr(attention, "BLOCK_N", 16)


@pytest.mark.parametrize("heads", HEADS)
def test_reference_matches_dense_float64(heads, paged_batch, dense_reference):
    hq, hkv = heads
    batch = paged_batch(MIXED, hq, hkv, head_dim=16, block_size=4, seed=1, device="cpu")
    out = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q,
                              batch.seq_lens, batch.block_tables, batch.scale)
    torch.testing.assert_close(out.double(), dense_reference(batch), atol=2e-5, rtol=2e-5)


def test_reference_in_query_chunks_matches_dense(paged_batch, dense_reference, monkeypatch):
    """The CPU reference scores long prompts QUERY_CHUNK queries at a time: same result."""
    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    batch = paged_batch(MIXED, 4, 2, head_dim=16, block_size=4, seed=3, device="cpu")
    out = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q,
                              batch.seq_lens, batch.block_tables, batch.scale)
    torch.testing.assert_close(out.double(), dense_reference(batch), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(heads, dtype, small_tiles, paged_batch, device):
    hq, hkv = heads
    batch = paged_batch(MIXED, hq, hkv, head_dim=16, block_size=4, dtype=dtype, seed=2)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)
    out = torch.full_like(batch.q, float("nan"))  # every real row must be overwritten
    paged_attention(*args, out=out)
    ref = paged_attention_ref(*args)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_triton_default_tiles_long_chunked_prefill(paged_batch, dense_reference):
    # Default tile sizes; a chunk of 70 new tokens after a 100-token prefix crosses tiles both ways.
    batch = paged_batch([(70, 170), (1, 65)], 4, 2, head_dim=32, block_size=16, seed=3)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)
    out = paged_attention(*args)
    torch.testing.assert_close(out.double().cpu(), dense_reference(batch), atol=2e-5, rtol=2e-5)


def test_triton_head_dim_not_power_of_two(small_tiles, paged_batch):
    batch = paged_batch([(6, 6), (3, 20), (1, 9)], 4, 2, head_dim=24, block_size=8, seed=4)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)
    torch.testing.assert_close(paged_attention(*args), paged_attention_ref(*args),
                               atol=2e-5, rtol=2e-5)


def test_int32_and_strided_query(small_tiles, paged_batch):
    # q as a column slice of a fused QKV buffer: row stride != Hq * D.
    batch = paged_batch([(7, 7), (1, 12)], 4, 2, head_dim=16, block_size=4, seed=5)
    t, hq, d = batch.q.shape
    qkv = torch.randn(t, (hq + 4) * d, device=batch.q.device)
    qkv[:, : hq * d] = batch.q.reshape(t, -1)
    q = qkv[:, : hq * d].view(t, hq, d)
    assert not q.is_contiguous()
    args = (batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)
    torch.testing.assert_close(paged_attention(q, *args), paged_attention_ref(batch.q, *args),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (28, 4)])
def test_gpu_bf16_realistic(heads, paged_batch):
    hq, hkv = heads
    seqs = [(300, 300), (128, 1000), (1, 513), (1, 2000), (17, 17)] + [(1, 77)] * 20
    batch = paged_batch(seqs, hq, hkv, head_dim=128, block_size=16, dtype=torch.bfloat16,
                              seed=6, device="cuda")
    args = (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)
    torch.testing.assert_close(paged_attention(*args), paged_attention_ref(*args),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(paged_batch):
    batch = paged_batch([(5, 40), (1, 90), (3, 3)], 8, 2, head_dim=128, block_size=16,
                              dtype=torch.bfloat16, seed=7, device="cuda")
    args = (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens,
            batch.block_tables, batch.scale)
    out = torch.empty_like(batch.q)
    paged_attention(*args, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*args, out=out)
    batch.seq_lens[1] = 80  # new lengths after capture: the replay must read them on the device
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out, paged_attention_ref(*args), atol=2e-2, rtol=2e-2)

"""argmax_rows: greedy sampling's argmax, against torch.argmax."""
from __future__ import annotations

import pytest
import torch

from kernels import _triton, argmax


@pytest.fixture
def small_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(argmax, "BLOCK", 64)  # several chunks a row on interpreter-sized rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1000), (5, 64), (3, 257)])
def test_matches_torch_and_leaves_tickets_zero(dtype, shape, small_block):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    for _ in range(2):  # a counter left non-zero would break the second call
        assert torch.equal(argmax.argmax_rows(logits), torch.argmax(logits, dim=-1))
    assert not _triton._TICKETS[logits.device].any()


def test_first_index_of_ties_and_nan_beats_numbers(small_block):
    logits = torch.zeros(4, 300)
    logits[0, [70, 5, 200]] = 3.0  # ties across chunks: the first index
    logits[1, [130, 129]] = 2.0  # ties inside a chunk
    logits[2, 250] = float("nan")  # NaN beats every number, as in torch.argmax
    logits[2, 10] = 1e30
    logits[3] = float("-inf")  # all -inf: index 0
    out = torch.full((4,), -7, dtype=torch.int64)
    argmax.argmax_rows(logits, out=out)
    assert out.tolist() == [5, 129, 250, 0] == torch.argmax(logits, dim=-1).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 256])
def test_gpu_bf16_vocab_in_a_graph(rows):
    logits = torch.randn(rows, 128256, device="cuda").to(torch.bfloat16)
    out = torch.empty(rows, dtype=torch.int64, device="cuda")
    argmax.argmax_rows(logits, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax.argmax_rows(logits, out=out)
    for seed in range(3):
        logits.copy_(torch.randn(rows, 128256, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, torch.argmax(logits, dim=-1))

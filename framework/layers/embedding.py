"""Vocabulary split over ranks: each rank embeds (and scores) a contiguous slice of the vocab."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from framework.layers.linear import _copy
from framework.parallel import ParallelInfo, all_gather_last_dim, all_reduce


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: ParallelInfo = ParallelInfo()):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.rows = -(-vocab_size // tp.size)  # the last rank's slice is zero-padded
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = max(0, min(self.rows, self.vocab_size - self.start))
        _copy(param.data[:n], loaded.narrow(0, self.start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0), self.tp.size)


class ParallelLMHead(VocabParallelEmbedding):
    """Scores this rank's vocab slice, then gathers the full row of logits."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(kernels.linear(hidden, self.weight), self.tp.size)  # decode rows: the GEMV
        return logits[..., :self.vocab_size]

"""Next-token choice per sequence: greedy, or temperature with top-k / top-p filtering.

Seeded requests draw from their own generator, so their tokens do not depend on what else
is in the batch, nor on preemption.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from framework.engine.sampling_params import SamplingParams


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: List[SamplingParams],
           generators: List[Optional[torch.Generator]], default_generator: torch.Generator) -> List[int]:
    """logits: [B, V] float32 on any device (one row per sequence that samples this step); greedy
    rows read back one token each, sampled rows are drawn on the CPU (seeded generators live there)."""
    greedy = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    host = dict(zip(rows, logits[rows].cpu())) if rows else {}  # one copy for all sampled rows
    tokens = []
    for i, p in enumerate(params):
        if p.greedy:
            tokens.append(greedy[i])
            continue
        row = _filter(host[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        gen = generators[i] or default_generator
        tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tokens

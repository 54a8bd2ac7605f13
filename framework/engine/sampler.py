"""Next-token choice per sequence: greedy, or temperature with top-k / top-p / min-p filtering,
after the request's penalties and its min_tokens mask; optionally with log-probabilities.

Seeded requests draw from their own generator, so their tokens do not depend on what else
is in the batch, nor on preemption. A row that fails (whatever the cause) fails only its own
sequence: the caller gets the error in that row's Sampled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from framework.engine.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs of one sequence besides its logits row."""
    params: SamplingParams
    generator: Optional[torch.Generator]
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]  # generated so far (no placeholder)
    banned_ids: Sequence[int] = ()  # EOS and stop tokens while min_tokens is not reached


@dataclass
class Sampled:
    token: int
    logprob: Optional[float] = None  # of `token` under the model's distribution (raw logits)
    top: List[Tuple[int, float]] = field(default_factory=list)  # the params.logprobs likeliest
    error: Optional[str] = None


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """Repetition (over prompt and output), then frequency and presence (over the output)."""
    p = row.params
    logits = logits.clone()
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.int64)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(list(row.output_ids), dtype=torch.int64),
                                minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _sample_row(raw: torch.Tensor, row: SampleRow, default_generator: torch.Generator) -> Sampled:
    p = row.params
    logits = apply_penalties(raw, row) if p.has_penalties else raw
    if row.banned_ids:
        logits = logits.clone() if logits is raw else logits
        logits[list(row.banned_ids)] = float("-inf")
    if p.greedy:
        token = int(logits.argmax())
    else:
        probs = _filter(logits / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=row.generator or default_generator))
    if p.logprobs is None:
        return Sampled(token)
    logprobs = raw.log_softmax(-1)
    top = torch.topk(logprobs, p.logprobs) if p.logprobs else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return Sampled(token, float(logprobs[token]), pairs)


def sample(logits: torch.Tensor, rows: List[SampleRow], default_generator: torch.Generator) -> List[Sampled]:
    """logits: [B, V] on any device (one row per sequence that samples this step). Plain greedy
    rows read back one token each; the others are copied to the host once and handled there in
    float32 (seeded generators live there)."""
    greedy = logits.argmax(dim=-1).tolist()
    special = [i for i, r in enumerate(rows) if not r.params.plain_greedy]
    host = dict(zip(special, logits[special].float().cpu())) if special else {}
    results = []
    for i, row in enumerate(rows):
        if row.params.plain_greedy:
            results.append(Sampled(greedy[i]))
            continue
        try:
            results.append(_sample_row(host[i], row, default_generator))
        except Exception as exc:  # e.g. a row of NaN logits: this sequence's failure only
            results.append(Sampled(-1, error=f"sampling failed: {type(exc).__name__}: {exc}"))
    return results

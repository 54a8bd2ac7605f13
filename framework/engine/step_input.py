"""One step's work for the model, as plain lists: what rank 0 sends to every rank."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from framework.engine.scheduler import ScheduledBatch


@dataclass
class StepInput:
    input_ids: List[int]
    positions: List[int]
    slot_mapping: List[int]
    cu_seqlens_q: List[int]
    seq_lens: List[int]
    block_tables: List[List[int]]
    logits_indices: List[int]  # rows whose next-token logits are needed
    decode_only: bool
    # the sliding-window layers' KV group (block_manager.py), when the model has one; else empty
    window_slot_mapping: List[int] = field(default_factory=list)
    window_block_tables: List[List[int]] = field(default_factory=list)
    # M-RoPE: [3][T] positions when a prompt chunk of a sequence with images is in the step (text
    # and generated tokens repeat their 1-D position in all three rows); None otherwise
    mrope_positions: Optional[List[List[int]]] = None
    # multimodal: items to run through the encoder now, (content hash, modality, processor outputs) ...
    mm_encode: List[Tuple[str, str, Dict[str, Any]]] = field(default_factory=list)
    # ... where encoder outputs replace token embeddings: (first step row, content hash, first
    # embedding row of the item, count) ...
    mm_spans: List[Tuple[int, str, int, int]] = field(default_factory=list)
    # ... and encoder outputs no request needs any more (the scheduler's encoder cache evicted them)
    mm_evict: List[str] = field(default_factory=list)
    # [T] each token's last visible key position, when a chunk in the step holds a bidirectional
    # run (Gemma-3's images, sequence.bidirectional_runs); empty: causal everywhere
    causal_limits: List[int] = field(default_factory=list)
    # async scheduling: the logits rows whose argmax every rank writes to its runner's `sampled`
    # buffer, which the next step's placeholders read (0: the engine samples these logits itself)
    greedy_rows: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def _positions(seq, start: int, end: int) -> Tuple[List[int], Optional[List[List[int]]]]:
    """1-D positions of tokens [start, end), and their 3 rows when the prompt's M-RoPE rows apply."""
    delta = seq.mrope_delta
    flat = [p + delta for p in range(start, end)]
    mrope = seq.mrope_positions
    if mrope is None or start >= seq.num_prompt_tokens:
        return flat, None
    prompt_end = min(end, seq.num_prompt_tokens)
    rows = mrope[:, start:prompt_end].tolist()
    tail = flat[prompt_end - start:]
    return flat, [row + tail for row in rows]


def _runs_in(seq, start: int, end: int) -> bool:
    return any(a < end and b > start for a, b in seq.bidirectional_runs)


def _causal_limits(seq, start: int, end: int) -> List[int]:
    """Tokens [start, end): a token inside a bidirectional run sees up to the run's last position,
    any other its own. The scheduler ends chunks only outside runs (or at a run's end)."""
    limits = list(range(start, end))
    for a, b in seq.bidirectional_runs:
        if a < end and b > start:
            assert b <= end, f"a prefill chunk [{start}, {end}) ends inside the bidirectional run [{a}, {b})"
            limits[max(a, start) - start:b - start] = [b - 1] * (b - max(a, start))
    return limits


def build_step_input(batch: ScheduledBatch, block_size: int) -> StepInput:
    step = StepInput([], [], [], [0], [], [], [], True)
    rows3: List[Optional[List[List[int]]]] = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        base = len(step.input_ids)
        step.input_ids += seq.token_ids[start:end]
        flat, three = _positions(seq, start, end)
        step.positions += flat
        rows3.append(three)
        step.slot_mapping += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        step.cu_seqlens_q.append(step.cu_seqlens_q[-1] + n)
        step.seq_lens.append(end)
        step.block_tables.append(seq.block_table)
        if seq.window_block_table:
            window = seq.window_block_table
            step.window_slot_mapping += [window[p // block_size] * block_size + p % block_size for p in range(start, end)]
            step.window_block_tables.append(window)
        if end == seq.num_tokens:  # reached the newest token: this step yields the next one
            step.logits_indices.append(step.cu_seqlens_q[-1] - 1)
        step.decode_only &= n == 1
        for placed in seq.mm_items:  # the part of each item's placeholder run in this chunk
            lo, hi = max(start, placed.offset), min(end, placed.end)
            if lo < hi:
                step.mm_spans.append((base + lo - start, placed.item.content_hash, lo - placed.offset, hi - lo))
    if any(r is not None for r in rows3):
        step.mrope_positions = [[], [], []]
        lo = 0
        for seq_rows, n in zip(rows3, batch.num_new_tokens):
            flat = step.positions[lo:lo + n]
            for r in range(3):
                step.mrope_positions[r] += seq_rows[r] if seq_rows is not None else flat
            lo += n
    if any(_runs_in(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
           for seq, n in zip(batch.seqs, batch.num_new_tokens)):
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            step.causal_limits += _causal_limits(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
    step.mm_encode = list(batch.mm_encode)
    step.mm_evict = list(batch.mm_evict)
    return step

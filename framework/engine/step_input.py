"""One step's work for the model, as plain lists: what rank 0 sends to every rank."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def build_step_input(batch: ScheduledBatch, block_size: int) -> StepInput:
    step = StepInput([], [], [], [0], [], [], [], True)
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        step.input_ids += seq.token_ids[start:end]
        step.positions += range(start, end)
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
    return step

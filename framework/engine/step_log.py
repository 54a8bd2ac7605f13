"""What each engine step computed, a few ints a step, for the schedule roofline (tasks/roofline.py).

Off unless someone (task=bench) sets `LLMEngine.step_log`. Each record is taken from the
scheduler's batch on the host when the step is launched: no device read, no sync. On CUDA an
event is recorded after the step's launch as well; the gaps between consecutive events, read
once the run is over, are each step's device time, idle time before it included.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from framework.engine.scheduler import ScheduledBatch


class StepRecord(NamedTuple):
    tokens: int  # new tokens computed (rows through every linear layer)
    seqs: int
    logits_rows: int  # rows through the LM head (sequences that sample)
    context_tokens: int  # sum of each sequence's length after the step: the K/V its attention reads
    attended: int  # (query, key) pairs under the causal mask, summed over the step's new tokens
    graphed: bool  # replayed as a CUDA graph


def attended_pairs(q_len: int, seq_len: int) -> int:
    """New tokens at positions seq_len - q_len .. seq_len - 1, each seeing itself and all before:
    sum of (p + 1) over those positions."""
    return q_len * seq_len - q_len * (q_len - 1) // 2


def record_of(batch: ScheduledBatch, logits_rows: int, graphed: bool) -> StepRecord:
    context = attended = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        end = seq.num_computed_tokens + n
        context += end
        attended += attended_pairs(n, end)
    return StepRecord(batch.num_tokens, len(batch.seqs), logits_rows, context, attended, graphed)


class StepLog:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.records: List[StepRecord] = []
        self.events: List[torch.cuda.Event] = []
        self.start: Optional[torch.cuda.Event] = None

    def begin(self) -> None:
        """Forget earlier steps; the first step's device time is counted from now."""
        self.records.clear()
        self.events.clear()
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()

    def add(self, record: StepRecord) -> None:
        self.records.append(record)
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def step_seconds(self) -> List[float]:
        """Device seconds of each step, from the previous step's end (or `begin`) to its own end.
        Synchronizes: call after the run. Empty on the CPU."""
        if not self.cuda or not self.events:
            return []
        self.events[-1].synchronize()
        marks = [self.start] + self.events
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]

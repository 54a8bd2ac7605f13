"""A step's integer inputs on the device with one host-to-device copy.

Every field of a StepInput is packed into one page-locked host byte buffer, int64 fields first
(token ids, positions, cache slots, logits rows) and int32 fields after (cu_seqlens, seq_lens,
block tables), then copied with a single non-blocking `copy_`; the device tensors are views of
the copied bytes, so no dtype conversion and no second launch follow. The CUDA graph runner uses
the same buffer with a fixed layout (`stage_decode`) whose device twin is its static input.

The host buffer is reused: before rewriting it, `_wait` blocks until the previous copy has read
it (an event, usually long done since the engine synchronizes on the sampled tokens).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from framework.engine.step_input import StepInput


class StepTensors(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, -1 = do not store
    logits_indices: torch.Tensor  # [L] int64
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, W] int32, zero past each sequence's blocks
    # the sliding-window layers' KV group, when the model has one (block_manager.py)
    window_slot_mapping: Optional[torch.Tensor] = None  # [T] int64
    window_block_tables: Optional[torch.Tensor] = None  # [B, W'] int32


def fill_sampled(input_ids: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Input ids with every placeholder -(r+1) replaced by sampled[r], on the device.

    With async scheduling a step is built before the previous step's tokens reach the host; each
    such token enters the step as -(r+1), r its row among the previous step's sampled tokens
    (`sampled`, written there by the engine's argmax), and is looked up here without a sync."""
    rows = (-1 - input_ids).clamp(min=0)
    return torch.where(input_ids < 0, sampled.index_select(0, rows), input_ids)


def fill_block_tables(out: np.ndarray, tables: Sequence[List[int]]) -> None:
    """out: [rows >= len(tables), W] int32 view; each row gets its table, zero-padded."""
    out[:len(tables)] = 0
    for row, table in zip(out, tables):
        row[:len(table)] = table


def fill_window_tables(out: np.ndarray, tables: Sequence[List[int]]) -> None:
    """fill_block_tables for the window group: its released entries (-1, never read by a real
    row) become block 0, so that no device table ever names a block outside the cache (a CUDA
    graph's padding row reads entry 0 of whatever its row held before)."""
    fill_block_tables(out, tables)
    np.maximum(out, 0, out=out)


class HostStaging:
    def __init__(self, device: torch.device, nbytes: int = 1 << 16):
        self.device = device
        self.cuda = device.type == "cuda"
        self.event = torch.cuda.Event() if self.cuda else None
        self._copied = False
        self._alloc(nbytes)

    def _alloc(self, nbytes: int) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        self.np = self.host.numpy()

    def _wait(self, nbytes: int) -> None:
        if self._copied:
            self.event.synchronize()
            self._copied = False
        if nbytes > self.host.numel():
            self._alloc(1 << (nbytes - 1).bit_length())

    def _views(self, n64: int, n32: int):
        a64 = self.np[:8 * n64].view(np.int64)
        a32 = self.np[8 * n64:8 * n64 + 4 * n32].view(np.int32)
        return a64, a32

    def _send(self, nbytes: int, dst: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Copy the first nbytes to the device (into dst[:nbytes] when given) and return them."""
        src = self.host[:nbytes]
        if dst is None:
            dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        else:
            dst = dst[:nbytes]
        dst.copy_(src, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()
            self._copied = True
        return dst

    def stage(self, step: StepInput) -> StepTensors:
        """Any step (prefill, mixed, decode) as fresh device tensors, block tables width = the longest.

        Every field starts on a 16-byte boundary: Triton specializes a kernel on whether each
        pointer argument is 16-byte aligned, so packed fields would compile a new variant of the
        attention and rotary kernels for each parity of T and B, inside the first requests."""
        t, b, n_logits = len(step.input_ids), step.num_seqs, len(step.logits_indices)
        w = max(1, max(len(x) for x in step.block_tables))
        windowed = bool(step.window_block_tables)
        ww = max(1, max(len(x) for x in step.window_block_tables)) if windowed else 0
        t2 = _round(t, 2)  # int64 fields, in elements of 8 bytes
        nt = (4 if windowed else 3) * t2
        n64 = nt + _round(n_logits, 2)
        b1, b4, tw = _round(b + 1, 4), _round(b, 4), _round(b * w, 4)  # int32 fields, 4 bytes each
        n32 = b1 + b4 + tw + b * ww
        nbytes = 8 * n64 + 4 * n32
        self._wait(nbytes)
        a64, a32 = self._views(n64, n32)
        a64[:t] = step.input_ids
        a64[t2:t2 + t] = step.positions
        a64[2 * t2:2 * t2 + t] = step.slot_mapping
        if windowed:
            a64[3 * t2:3 * t2 + t] = step.window_slot_mapping
        a64[nt:nt + n_logits] = step.logits_indices
        a32[:b + 1] = step.cu_seqlens_q
        a32[b1:b1 + b] = step.seq_lens
        tables, window = b1 + b4, b1 + b4 + tw
        fill_block_tables(a32[tables:tables + b * w].reshape(b, w), step.block_tables)
        if windowed:
            fill_window_tables(a32[window:window + b * ww].reshape(b, ww), step.window_block_tables)
        dev = self._send(nbytes)
        d64 = dev[:8 * n64].view(torch.int64)
        d32 = dev[8 * n64:].view(torch.int32)
        return StepTensors(d64[:t], d64[t2:t2 + t], d64[2 * t2:2 * t2 + t], d64[nt:nt + n_logits],
                           d32[:b + 1], d32[b1:b1 + b], d32[tables:tables + b * w].view(b, w),
                           d64[3 * t2:3 * t2 + t] if windowed else None,
                           d32[window:window + b * ww].view(b, ww) if windowed else None)


def _round(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class DecodeLayout:
    """The fixed layout of a CUDA graph's inputs: rows for `max_batch` sequences, tables `width` wide.

    int64: ids [M] | positions [M] | slots [M] (| window slots [M]);
    int32: seq_lens [M] | per row: its block table [W] (| its window block table [W]).
    A row's two tables sit side by side, so the first `batch` rows are one prefix of the buffer.
    """

    def __init__(self, max_batch: int, width: int, windowed: bool = False):
        self.max_batch, self.width, self.windowed = max_batch, width, windowed
        self.row_width = 2 * width if windowed else width
        self.n64 = (4 if windowed else 3) * max_batch
        self.n32 = max_batch + max_batch * self.row_width
        self.nbytes = 8 * self.n64 + 4 * self.n32

    def bytes_for(self, batch: int) -> int:
        """Header of every row plus the block tables of the first `batch` rows."""
        return 8 * self.n64 + 4 * (self.max_batch + batch * self.row_width)

    def views(self, buf: torch.Tensor, size: int):
        """(ids, positions, slots, seq_lens, block_tables, window_slots, window_block_tables) of the
        first `size` rows of a device buffer; the window ones None without a window group."""
        m, w = self.max_batch, self.width
        d64 = buf[:8 * self.n64].view(torch.int64)
        d32 = buf[8 * self.n64:self.nbytes].view(torch.int32)
        rows = d32[m:m + size * self.row_width].view(size, self.row_width)
        window = (d64[3 * m:3 * m + size], rows[:, w:]) if self.windowed else (None, None)
        return (d64[:size], d64[m:m + size], d64[2 * m:2 * m + size], d32[:size], rows[:, :w]) + window


def stage_decode(staging: HostStaging, layout: DecodeLayout, step: Optional[StepInput],
                 dst: torch.Tensor) -> None:
    """Write a decode step (or none: all padding) into `dst`, the graph's static input.

    Rows past the batch are padding: token 0 at position 0, slot -1 (nothing stored), seq_len 1,
    so attention reads one key of whatever block their table row names (a valid block: the row
    holds zeros or an earlier step's blocks, and the cache never shrinks)."""
    m, w, rw = layout.max_batch, layout.width, layout.row_width
    b = step.num_seqs if step is not None else 0
    nbytes = layout.bytes_for(b) if step is not None else layout.nbytes
    staging._wait(layout.nbytes)
    a64, a32 = staging._views(layout.n64, layout.n32)
    a64[:] = 0
    a64[2 * m:] = -1  # slots (and window slots)
    a32[:m] = 1
    if step is not None:
        a64[:b] = step.input_ids
        a64[m:m + b] = step.positions
        a64[2 * m:2 * m + b] = step.slot_mapping
        a32[:b] = step.seq_lens
        rows = a32[m:m + b * rw].reshape(b, rw)
        fill_block_tables(rows[:, :w], step.block_tables)
        if layout.windowed:
            a64[3 * m:3 * m + b] = step.window_slot_mapping
            fill_window_tables(rows[:, w:], step.window_block_tables)
    else:
        a32[m:] = 0
    staging._send(nbytes, dst)

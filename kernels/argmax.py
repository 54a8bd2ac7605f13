"""Greedy sampling's argmax over each row of the logits, in one kernel (inside the decode graphs).

torch.argmax reduces a [1, 128256] row with one 512-thread block: 28 us on an H200, 0.6% of a
batch-1 decode step of the 8B model. Here each row is cut into BLOCK-wide chunks, one program a
chunk, and the last program of a row to finish (a ticket, as in decode attention) picks among the
chunks' maxima: a few microseconds at any batch.

Same answer as torch.argmax: the first index of the largest value; NaN beats every number (it
counts as +inf here: a row holding both +inf and NaN gives the first of them, torch the NaN).
"""
from __future__ import annotations

import torch

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton, zeroed_tickets

BLOCK = 4096  # values a program: 8 KiB of bf16 logits, 32 a thread at 4 warps


@triton.jit
def _argmax_kernel(x_ptr, part_val_ptr, part_idx_ptr, tickets_ptr, out_ptr, V, stride_x,
                   CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN beats numbers, as in torch.argmax
    best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(part_val_ptr + row * CHUNKS + chunk, best)
    tl.store(part_idx_ptr + row * CHUNKS + chunk, at + chunk * BLOCK)
    # The last chunk of the row to finish picks (see decode_attention for the ordering argument).
    tl.debug_barrier()
    ticket_ptr = tickets_ptr + row
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == CHUNKS - 1:
        tl.store(ticket_ptr, 0)
        c = tl.arange(0, CHUNKS_P2)
        vals = tl.load(part_val_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=V, cache_modifier=".cg")
        top = tl.max(vals, axis=0)
        tl.store(out_ptr + row, tl.min(tl.where(vals == top, idxs, V), axis=0).to(tl.int64))


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: logits [B, V] -> int64 [B], the argmax of each row (into `out` when given)."""
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    assert out.shape == (rows,) and out.dtype == torch.int64
    if rows == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    chunks = triton.cdiv(vocab, BLOCK)
    part_val = torch.empty(rows * chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows * chunks, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(rows, chunks)](
        logits, part_val, part_idx, zeroed_tickets(logits.device, rows), out, vocab, logits.stride(0),
        CHUNKS=chunks, CHUNKS_P2=next_pow2(chunks), BLOCK=BLOCK, num_warps=4, **pdl(logits.device))
    return out

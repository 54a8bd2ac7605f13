"""Decode steps replayed as CUDA graphs (GPU only; `compilation.enforce_eager=true` captures none).

A pure-decode step of B sequences replays the graph of the smallest captured batch size >= B;
the rows past B are padding (see step_tensors.stage_decode: slot -1, seq_len 1, a valid block).
Every graph reads one static input buffer, written by one host-to-device copy per step, and
writes one static logits buffer; the decode attention kernel gets `max_seq_len=max_model_len`
(a Python int), so its split count is fixed at capture and nothing in a graph reads the host.

All graphs share one memory pool. The largest size is captured first and every capture frees
its intermediates before the next begins, so the smaller graphs reuse the largest one's memory:
the pool is about one decode step's activations at the largest size.

Memory is known before the KV cache is sized (`measure_graph_memory`): the engine captures the
largest size once against a one-block stand-in cache, measures what the device lost, frees it,
and subtracts that from the KV budget; the real graphs are captured after the KV cache exists
(they must point at it) and their measured cost is logged beside the estimate.
"""
from __future__ import annotations

import bisect
import gc
import logging
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from framework.engine.step_input import StepInput
from framework.engine.step_tensors import DecodeLayout, HostStaging, fill_sampled, stage_decode
from framework.layers.attention import AttentionMetadata
from kernels.argmax import argmax_rows

log = logging.getLogger(__name__)


def device_memory() -> Dict[str, int]:
    """After freeing the allocator's unused cache: torch's reserved bytes and everything else used."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    return {"reserved": reserved, "non_torch": total - free - reserved, "used": total - free}


class _NoGC:
    """torch.cuda.graph runs gc.collect() before each capture; once for all of them is enough."""

    def __enter__(self):
        gc.collect()
        self._collect, gc.collect = gc.collect, lambda *a, **k: 0
        return self

    def __exit__(self, *exc):
        gc.collect = self._collect


class CudaGraphRunner:
    """Graphs of `forward` + `compute_logits` at fixed decode batch sizes, sharing one pool."""

    def __init__(self, forward: Callable, compute_logits: Callable, sizes: List[int], max_model_len: int,
                 block_size: int, device: torch.device, sampled: Optional[torch.Tensor] = None,
                 windowed: bool = False):
        self.forward, self.compute_logits = forward, compute_logits
        # async scheduling: placeholders in the ids are filled from it, and every row's argmax is
        # written back to it, inside the graph (rows past the step's own are never read)
        self.sampled = sampled
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        self.layout = DecodeLayout(self.max_batch, -(-max_model_len // block_size), windowed)
        self.device = device
        self.staging = HostStaging(device, self.layout.nbytes)
        self.static_in = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        self.cu_seqlens = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)
        self.logits: Optional[torch.Tensor] = None  # [max_batch, vocab], allocated at capture
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.capture_seconds = 0.0
        self.replays = 0

    def _run(self, size: int) -> None:
        ids, positions, slots, seq_lens, tables, window_slots, window_tables = self.layout.views(self.static_in, size)
        if self.sampled is not None:
            ids = fill_sampled(ids, self.sampled)
        meta = AttentionMetadata(slot_mapping=slots, cu_seqlens_q=self.cu_seqlens[:size + 1], seq_lens=seq_lens,
                                 block_tables=tables, decode_only=True, max_seq_len=self.max_model_len,
                                 window_slot_mapping=window_slots, window_block_tables=window_tables)
        logits = self.compute_logits(self.forward(ids, positions, meta))
        if self.logits is None:
            self.logits = torch.empty((self.max_batch, logits.shape[-1]), dtype=logits.dtype, device=self.device)
        self.logits[:size].copy_(logits)
        if self.sampled is not None:  # async scheduling: the greedy tokens, taken inside the graph
            argmax_rows(logits, out=self.sampled[:size])

    @torch.inference_mode()
    def capture(self, sizes: Optional[List[int]] = None) -> None:
        """Capture `sizes` (default: all), largest first, into the shared pool."""
        start = time.perf_counter()
        stage_decode(self.staging, self.layout, None, self.static_in)  # every row is padding
        self.pool = torch.cuda.graph_pool_handle()
        with _NoGC():
            # a bar on terminals only; it prints between captures, never inside one
            for size in tqdm(sorted(sizes or self.sizes, reverse=True), desc="capturing CUDA graphs", unit="graph",
                             leave=False, disable=not sys.stderr.isatty()):
                self._run(size)  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._run(size)
                self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def run_eagerly(self) -> None:
        """Each size's step once, outside any graph, on all-padding input (the runner's kernel
        precompilation notes the Triton variants the captures will launch)."""
        stage_decode(self.staging, self.layout, None, self.static_in)
        for size in sorted(self.sizes, reverse=True):
            self._run(size)

    def release(self) -> None:
        self.graphs.clear()
        self.pool = None
        self.logits = None
        self.static_in = self.cu_seqlens = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def replay(self, step: StepInput) -> torch.Tensor:
        """Logits [B, vocab] (a view of the static output: read it before the next replay)."""
        b = step.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, b)]
        stage_decode(self.staging, self.layout, step, self.static_in)
        self.graphs[size].replay()
        self.replays += 1
        return self.logits[:b]

    def time_replay(self, size: int, iters: int = 50) -> float:
        """Median seconds of one replay of the `size` graph on all-padding input (slots -1: the
        cache is untouched): the model's step time with no host work between steps."""
        stage_decode(self.staging, self.layout, None, self.static_in)
        graph = self.graphs[size]
        for _ in range(5):
            graph.replay()
        times = []
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]


def measure_graph_memory(make: Callable[[], CudaGraphRunner]) -> Dict[str, int]:
    """What the graphs will cost, measured before the KV cache exists: build a runner (against a
    stand-in cache), capture only its largest size, measure, free everything.

    The smaller sizes reuse the largest one's pool; what each adds is its graph object
    (non-torch memory), so that part is counted once per size."""
    before = device_memory()
    graphs = make()
    graphs.capture([graphs.max_batch])
    alive = device_memory()
    nsizes, seconds = len(graphs.sizes), graphs.capture_seconds
    graphs.release()
    del graphs
    after = device_memory()
    torch_bytes = alive["reserved"] - before["reserved"]
    per_graph = max(0, alive["non_torch"] - after["non_torch"])
    return {"bytes": torch_bytes + per_graph * nsizes, "pool_bytes": torch_bytes,
            "graph_object_bytes": per_graph, "seconds": seconds}

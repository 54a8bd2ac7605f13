"""GPU sweep of the attention kernels' tile configs on the shapes of bench's 256-request workload
(Llama-3.1-8B heads, bf16, prompts 100-1024 + 512 outputs):

    python -m kernels.bench_attention            # the sweeps below
    python -m kernels.bench_attention --batch1   # one sequence's decode, split counts and tiles

- decode: 256 sequences, contexts uniform in 101..1536 (the decode steps of that run);
- mixed: a 1,848-token prompt chunk beside 200 decodes (a prefill step of that run at
  max_num_batched_tokens=2048), and pure prefill chunks of 2048 and 8192 tokens.
Each config's output is checked against the default config's (relative error), then timed with
`triton.testing.do_bench` (median, L2 flushed). GB/s counts K/V read once plus q and out.
The cache is in the engine's layout (kernels/kv_cache.py), its blocks handed out shuffled.
"""
from __future__ import annotations

import random
import sys

import torch
from triton.testing import do_bench

from kernels import attention as prefill
from kernels import decode_attention as decode
from kernels.bench import HEAD_DIM, HKV, HQ, _paged, copy_gbps

DECODE_CONFIGS = [  # (block_n, num_warps, num_stages, num_splits or None); the first is the default
    (128, 4, 3, None), (64, 4, 3, None), (64, 4, 2, None), (128, 4, 2, None), (128, 4, 4, None),
    (64, 4, 4, None), (128, 8, 3, None), (256, 8, 3, None), (256, 8, 2, None), (128, 4, 3, 2),
]
PREFILL_CONFIGS = [  # (block_m, block_n, num_warps, num_stages); the first is the default
    (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 2),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _kv_bytes(seqs) -> int:
    return 2 * sum(s for _, s in seqs) * HKV * HEAD_DIM * 2


def decode_sweep(roof: float) -> None:
    rng = random.Random(0)
    seqs = [(1, rng.randint(101, 1536)) for _ in range(256)]
    q, k, v, _, lens, tables = _paged(seqs)
    q = q.view(256, HQ, HEAD_DIM)
    nbytes = _kv_bytes(seqs) + 2 * q.numel() * 2
    ref = None
    print(f"decode, 256 seqs, contexts 101-1536 (mean {sum(s for _, s in seqs) / 256:.0f}), "
          f"{nbytes / 1e9:.3f} GB a call")
    for bn, warps, stages, splits in DECODE_CONFIGS:
        def fn():
            return decode.paged_decode_attention(q, k, v, lens, tables, HEAD_DIM ** -0.5, num_splits=splits,
                                                 max_seq_len=1536, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            out = fn()
        except Exception as exc:  # e.g. out of shared memory
            print(f"  block_n {bn:>3} warps {warps} stages {stages} splits {splits or 'auto':>4}: failed "
                  f"({type(exc).__name__})")
            continue
        ref = out if ref is None else ref
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"  block_n {bn:>3} warps {warps} stages {stages} splits {splits or 'auto':>4}: {1e3 * ms:8.1f} us "
              f"{nbytes / ms / 1e6:7.0f} GB/s {100 * nbytes / ms / 1e6 / roof:5.0f}% of copy  err {_rel(out, ref):.1e}")


BATCH1_CONFIGS = [(bn, 4, st, sp) for sp in (8, 4, 2, 1) for bn in (128, 64) for st in (3, 2)]


def batch1_sweep(contexts=(384, 1536), layers: int = 32) -> None:
    """One sequence, as a batch-1 decode step runs it: `layers` calls on caches of their own, each
    after a 128 MB copy (the GEMVs' weights pass through L2 between two layers' attention), in one
    CUDA graph; µs a call = (replay - the copies' replay) / layers."""
    flush_src = torch.empty(64 << 20, dtype=torch.int16, device="cuda")
    flush_dst = torch.empty_like(flush_src)

    def graph_us(body) -> float:
        body()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        return 1e3 * start.elapsed_time(end) / 20

    copies = graph_us(lambda: [flush_dst.copy_(flush_src) for _ in range(layers)])
    for context in contexts:
        cases = [_paged([(1, context)]) for _ in range(layers)]
        print(f"batch 1, context {context}, {layers} layers, graph max_seq_len 2048:")
        for bn, warps, stages, splits in BATCH1_CONFIGS:
            def body():
                for q, k, v, _, lens, tables in cases:
                    flush_dst.copy_(flush_src)
                    decode.paged_decode_attention(q.view(1, HQ, HEAD_DIM), k, v, lens, tables, HEAD_DIM ** -0.5,
                                                  num_splits=splits, max_seq_len=2048, block_n=bn, num_warps=warps,
                                                  num_stages=stages)
            try:
                us = (graph_us(body) - copies) / layers
            except Exception as exc:  # e.g. out of shared memory
                print(f"  splits {splits} block_n {bn:>3} stages {stages}: failed ({type(exc).__name__})")
                continue
            print(f"  splits {splits} block_n {bn:>3} warps {warps} stages {stages}: {us:6.2f} us a layer")


def prefill_sweep(roof: float, seqs, name: str) -> None:
    q, k, v, cu, lens, tables = _paged(seqs)
    pairs = sum(ql * s - ql * (ql - 1) // 2 for ql, s in seqs)
    flops = 4 * pairs * HQ * HEAD_DIM
    nbytes = _kv_bytes(seqs) + 2 * q.numel() * 2
    print(f"{name}: {flops / 1e12:.2f} TFLOP, {nbytes / 1e9:.3f} GB a call")
    ref = None
    for bm, bn, warps, stages in PREFILL_CONFIGS:
        def fn():
            return prefill.paged_attention(q, k, v, cu, lens, tables, HEAD_DIM ** -0.5, block_m=bm, block_n=bn,
                                           num_warps=warps, num_stages=stages)
        try:
            out = fn()
        except Exception as exc:  # e.g. out of shared memory
            print(f"  block_m {bm:>3} block_n {bn:>3} warps {warps} stages {stages}: failed ({type(exc).__name__})")
            continue
        ref = out if ref is None else ref
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"  block_m {bm:>3} block_n {bn:>3} warps {warps} stages {stages}: {1e3 * ms:8.1f} us "
              f"{flops / ms / 1e9:6.0f} TFLOP/s {nbytes / ms / 1e6:6.0f} GB/s  err {_rel(out, ref):.1e}")
    # the decode rows alone through the decode kernel: what splitting a mixed step would cost
    decodes = [(ql, s) for ql, s in seqs if ql == 1]
    if decodes and len(decodes) < len(seqs):
        dq, dk, dv, _, dlens, dtables = _paged(decodes)
        ms = do_bench(lambda: decode.paged_decode_attention(dq.view(-1, HQ, HEAD_DIM), dk, dv, dlens, dtables,
                                                             HEAD_DIM ** -0.5, max_seq_len=2048),
                      warmup=25, rep=100, return_mode="median")
        chunks = [(ql, s) for ql, s in seqs if ql > 1]
        cq, ck, cv, ccu, clens, ctables = _paged(chunks)
        ms2 = do_bench(lambda: prefill.paged_attention(cq, ck, cv, ccu, clens, ctables, HEAD_DIM ** -0.5),
                       warmup=25, rep=100, return_mode="median")
        print(f"  split instead: its {len(decodes)} decodes in the decode kernel {1e3 * ms:.1f} us + its chunks "
              f"alone (default config) {1e3 * ms2:.1f} us = {1e3 * (ms + ms2):.1f} us")


def main() -> None:
    assert torch.cuda.is_available(), "this sweep needs a CUDA device"
    torch.manual_seed(0)
    if "--batch1" in sys.argv:
        batch1_sweep()
        return
    roof = copy_gbps()
    print(f"# {torch.cuda.get_device_name()}, copy {roof:.0f} GB/s")
    decode_sweep(roof)
    rng = random.Random(1)
    prefill_sweep(roof, [(1, rng.randint(101, 1536)) for _ in range(200)] + [(1848, 1848)],
                  "mixed: 200 decodes + a 1848-token chunk")
    prefill_sweep(roof, [(2048, 2048)], "prefill 1 x 2048")
    prefill_sweep(roof, [(n, n) for n in (900, 700, 1024, 800, 1000, 600, 1024, 1024, 1024 - 2)],
                  "prefill 9 prompts, 8192 tokens")


if __name__ == "__main__":
    main()

"""GPU micro-benchmark: each Triton kernel against its torch reference, in GB/s.

    python -m kernels.bench            # Llama-3.1-8B layer shapes, bf16
    python -m kernels.bench --quick    # fewer cases (a smoke run)
    python -m kernels.bench --fp8      # only the fp8 table: W8A8 against weight-only and bf16

Every figure is measured in this process on this card, next to a device-to-device copy
(bytes read + written) that stands for the achievable HBM roofline. GB/s counts the minimum
bytes a kernel must move (inputs read once, outputs written once); for prefill attention,
which is compute-bound, TFLOP/s is printed too. `triton.testing.do_bench` clears L2 between
repetitions, so small inputs are not flattered by the cache. A last table times fused kernels
against the separate kernels they replace, in µs a call (what a graph-captured decode step saves).
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from triton.testing import do_bench, do_bench_cudagraph

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.attention import paged_attention, paged_attention_ref
from kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.fp8_linear import fp8_linear, fp8_linear_ref, quantize_rows
from kernels.gemv import linear_gemv, linear_ref
from kernels import linear as bf16_linear  # the engine's unquantized path: GEMV at one row, else cuBLAS
from kernels.kv_cache import store_kv_cache, store_kv_cache_ref
from kernels.quant_gemv import GEMV_MAX_ROWS, int4_gemv, rowscaled_gemv
from kernels.quant_matmul import quant_matmul
from framework.layers.quantization.int8 import scaled_linear  # the weight-only fp8 path, as dispatched
from kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary, apply_rotary_ref
from kernels.rotary_kv import rotary_store_kv

DTYPE = torch.bfloat16
HIDDEN, HQ, HKV, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336  # Llama-3.1-8B
BLOCK_SIZE = 16


@dataclass
class Case:
    name: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    bytes_moved: int
    flops: int = 0


def _ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=100)


def _graph_ms(fn: Callable[[], object]) -> float:
    """Time per call replayed from a CUDA graph: the GPU time without Python launch overhead
    (what the engine's graph-captured decode step pays). L2 is not flushed here."""
    try:
        return do_bench_cudagraph(fn, rep=100)
    except Exception:  # e.g. a host sync inside fn
        return float("nan")


def copy_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def elementwise_cases(tokens: int) -> list[Case]:
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE)
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    gu = torch.randn(tokens, 2 * INTER, device="cuda", dtype=DTYPE)
    q = torch.randn(tokens, HQ, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, HKV, HEAD_DIM, device="cuda", dtype=DTYPE)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    inv = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv)
    cos, sin = freqs.cos(), freqs.sin()
    num_blocks = math.ceil(tokens / BLOCK_SIZE) * 4
    k_cache = torch.zeros(num_blocks, HKV, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    t = f"T={tokens}"
    return [
        Case(f"rms_norm {t}", lambda: rms_norm(x, w, 1e-5), lambda: rms_norm_ref(x, w, 1e-5),
             2 * _nbytes(x)),
        Case(f"fused_add_rms_norm {t}", lambda: fused_add_rms_norm(x, res, w, 1e-5),
             lambda: fused_add_rms_norm_ref(x, res, w, 1e-5), 4 * _nbytes(x)),
        Case(f"silu_and_mul {t}", lambda: silu_and_mul(gu), lambda: silu_and_mul_ref(gu),
             _nbytes(gu) * 3 // 2),
        Case(f"apply_rotary {t}", lambda: apply_rotary(q, k, pos, cos, sin),
             lambda: apply_rotary_ref(q, k, pos, cos, sin), 2 * _nbytes(q, k)),
        Case(f"store_kv_cache {t}", lambda: store_kv_cache(k, k, k_cache, v_cache, slots),
             lambda: store_kv_cache_ref(k, k, k_cache, v_cache, slots), 4 * _nbytes(k)),
    ]


def _paged(seqs: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """Random q and a shuffled paged cache for (q_len, seq_len) pairs."""
    blocks = [math.ceil(s / BLOCK_SIZE) for _, s in seqs]
    num_blocks = sum(blocks)
    k_cache = torch.randn(num_blocks, HKV, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device="cuda").int()
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[start:start + n]
        start += n
    q_lens = torch.tensor([ql for ql, _ in seqs], dtype=torch.int32)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = q_lens.cumsum(0)
    seq_lens = torch.tensor([s for _, s in seqs], dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), HQ, HEAD_DIM, device="cuda", dtype=DTYPE)
    return q, k_cache, v_cache, cu.cuda(), seq_lens, tables


def decode_case(batch: int, context: int) -> Case:
    q, k_cache, v_cache, _, seq_lens, tables = _paged([(1, context)] * batch)
    args = (q, k_cache, v_cache, seq_lens, tables, HEAD_DIM**-0.5)
    kv_bytes = 2 * batch * context * HKV * HEAD_DIM * q.element_size()
    return Case(f"decode B={batch} ctx={context}",
                lambda: paged_decode_attention(*args, max_seq_len=context),
                lambda: paged_decode_attention_ref(*args), kv_bytes + 2 * _nbytes(q))


def mixed_case(seqs: list[tuple[int, int]], name: str) -> Case:
    q, k_cache, v_cache, cu, seq_lens, tables = _paged(seqs)
    args = (q, k_cache, v_cache, cu, seq_lens, tables, HEAD_DIM**-0.5)
    # Causal: the i-th new token sees (seq_len - q_len + i + 1) keys; 2 matmuls x 2 FLOP/MAC.
    keys_seen = sum(ql * (s - ql) + ql * (ql + 1) // 2 for ql, s in seqs)
    flops = 4 * keys_seen * HQ * HEAD_DIM
    kv_bytes = 2 * sum(s for _, s in seqs) * HKV * HEAD_DIM * q.element_size()
    return Case(name, lambda: paged_attention(*args), lambda: paged_attention_ref(*args),
                kv_bytes + 2 * _nbytes(q), flops)


# Unquantized linears of one layer, (N, K); the GEMV's weight bytes are the whole cost at decode.
LINEAR_SHAPES = {
    "qkv": ((HQ + 2 * HKV) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HQ * HEAD_DIM),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
}
# Weight copies per shape are cycled until they total this: far past the 50 MB L2 of an H100, so
# the graph-replayed figures (no L2 flush between calls) read every weight from HBM as decode does.
L2_DEFEAT_BYTES = 256 << 20


def _cycled(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> Callable[[], object]:
    """fn on the next weight of `weights` each call."""
    it = itertools.cycle(weights)
    return lambda: fn(next(it))


def linear_cases(batches: list[int]) -> list[Case]:
    """Triton GEMV vs cuBLAS F.linear for each layer shape and number of rows."""
    cases = []
    for name, (n, k) in LINEAR_SHAPES.items():
        w_bytes = n * k * DTYPE.itemsize
        weights = [torch.randn(n, k, device="cuda", dtype=DTYPE) * k**-0.5
                   for _ in range(max(2, math.ceil(L2_DEFEAT_BYTES / w_bytes)))]
        for rows in batches:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            cases.append(Case(f"linear {name} {n}x{k} M={rows}",
                              _cycled(lambda w, x=x: linear_gemv(x, w), weights),
                              _cycled(lambda w, x=x: linear_ref(x, w), weights),
                              w_bytes + rows * (k + n) * DTYPE.itemsize))
    return cases


# Random codes stand in for a quantized weight: the kernels' time does not depend on the values.
QUANT_WEIGHTS = {
    "int4": lambda n, k: (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"),
                          torch.rand(n, k // 128, device="cuda").to(DTYPE)),  # group 128
    "int8": lambda n, k: (torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
                          torch.rand(n, device="cuda")),
    "fp8": lambda n, k: (torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn), torch.rand(n, device="cuda")),
}
INT4_GEMV_TILES = [(4, 2048), (8, 2048), (16, 512), (16, 1024)]  # (block_n, block_k) besides the default
INT4_MATMUL_BLOCK_N = [64, 128, 256]  # weight rows of an int4 quant_matmul tile (default: 64 up to 16 rows, then 128)
QUANT_CHUNK_ROWS = [16, 64]  # rows past GEMV_MAX_ROWS: int4_linear sends up to SMALL_M (64) to quant_matmul


def quant_linear_cases(batches: list[int], sweep: bool) -> list[Case]:
    """Weight-only quantized linears of each layer shape: the int4 GEMV against the int4
    quant_matmul it replaces at decode, and the int8/fp8 GEMVs; each against cuBLAS on bf16
    weights at the same rows. Rows past GEMV_MAX_ROWS time only the int4 quant_matmul (the GEMVs
    take no more). GB/s counts the codes and scales read. `sweep`: the int4 GEMV at other tiles
    (1 row), the int4 quant_matmul at each of INT4_MATMUL_BLOCK_N (chunk rows: `/block_n`)."""
    cases = []
    for name, (n, k) in LINEAR_SHAPES.items():
        bf16 = [torch.randn(n, k, device="cuda", dtype=DTYPE)
                for _ in range(max(2, math.ceil(L2_DEFEAT_BYTES / (n * k * DTYPE.itemsize))))]
        quant = {}
        for method, make in QUANT_WEIGHTS.items():
            first = make(n, k)
            copies = max(2, math.ceil(L2_DEFEAT_BYTES / _nbytes(*first)))
            quant[method] = [first] + [make(n, k) for _ in range(copies - 1)]
        for rows in batches:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            cublas = _cycled(lambda w, x=x: linear_ref(x, w), bf16)
            fns = {"int4 gemv": lambda cs, x=x: int4_gemv(x, *cs),
                   "int4 quant_matmul": lambda cs, x=x: quant_matmul(x, *cs),
                   "int8 gemv": lambda cs, x=x: rowscaled_gemv(x, *cs),
                   "fp8 gemv": lambda cs, x=x: rowscaled_gemv(x, *cs)}
            if rows > GEMV_MAX_ROWS:  # more rows than the GEMVs take
                fns = {"int4 quant_matmul": fns["int4 quant_matmul"]}
            if sweep and rows == 1:
                for bn, bk in INT4_GEMV_TILES:
                    fns[f"int4 gemv {bn}x{bk}"] = lambda cs, x=x, bn=bn, bk=bk: int4_gemv(x, *cs, bn, bk)
            if sweep and rows > GEMV_MAX_ROWS:
                for bn in INT4_MATMUL_BLOCK_N:
                    fns[f"int4 quant_matmul/{bn}"] = lambda cs, x=x, bn=bn: quant_matmul(x, *cs, block_n=bn)
            for label, fn in fns.items():
                weights = quant[label.split()[0]]  # the method: int4, int8 or fp8
                cases.append(Case(f"{label} {name} M={rows}", _cycled(fn, weights), cublas,
                                  _nbytes(*weights[0])))
    return cases


FP8_ROWS = [1, 8, 32, 64, 256, 2048]


def fp8_table(rows_list: list[int]) -> None:
    """fp8 linears of each layer shape, µs a call replayed from a CUDA graph (weights cycled past
    L2): bf16 as the engine runs it (kernels.linear), weight-only fp8 as dispatched
    (int8.scaled_linear: GEMV, quant_matmul, or dequantize + cuBLAS), W8A8 (kernels/fp8_linear.py:
    per-token quantization + torch._scaled_mm) with exact and with fast accumulation, and the
    quantization alone. Then each W8A8 result (exact and fast accumulation) against its float32
    reference, ||err|| / ||ref||. TFLOP/s is the fast W8A8's."""
    print("\nfp8 linears, µs a call (CUDA graph replay); x: bf16 time / that time\n")
    header = (f"{'shape':<10}{'M':>6}{'bf16':>9}{'w-only':>9}{'w8a8':>9}{'w8a8 fast':>11}{'quant':>8}"
              f"{'x w-only':>10}{'x w8a8':>8}{'x fast':>8}{'TFLOP/s':>9}{'rel err':>9}{'fast err':>9}")
    print(header)
    print("-" * len(header))
    for name, (n, k) in LINEAR_SHAPES.items():
        copies = max(2, math.ceil(L2_DEFEAT_BYTES / (n * k)))
        bf16 = [torch.randn(n, k, device="cuda", dtype=DTYPE) * k**-0.5 for _ in range(max(2, copies // 2))]
        fp8 = [QUANT_WEIGHTS["fp8"](n, k) for _ in range(copies)]
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            times = [1e3 * _graph_ms(_cycled(fn, ws)) for fn, ws in (
                (lambda w: bf16_linear(x, w), bf16),
                (lambda cs: scaled_linear(x, cs[0], cs[1], None), fp8),
                (lambda cs: fp8_linear(x, *cs, fast_accum=False), fp8),
                (lambda cs: fp8_linear(x, *cs, fast_accum=True), fp8),
                (lambda cs: quantize_rows(x), fp8))]
            codes, scale = fp8[0]
            ref = fp8_linear_ref(x, codes, scale).float()
            err, err_fast = (((fp8_linear(x, codes, scale, fast_accum=f).float() - ref).norm() / ref.norm()).item()
                             for f in (False, True))
            b, wo, w8, fast, q = times
            print(f"{name:<10}{rows:>6}{b:>9.1f}{wo:>9.1f}{w8:>9.1f}{fast:>11.1f}{q:>8.1f}"
                  f"{b / wo:>9.2f}x{b / w8:>7.2f}x{b / fast:>7.2f}x{2 * rows * n * k / fast / 1e6:>9.0f}{err:>9.1e}"
                  f"{err_fast:>9.1e}")


FP8_SMALL_ROWS = [1]
# (block_n, block_k) of the one-row fp8 GEMV
FP8_GEMV_TILES = [(4, 1024), (8, 1024), (2, 2048), (1, 2048), (2, 4096), (4, 2048), (1, 4096), (8, 2048)]


def fp8_small_table(rows_list: list[int]) -> None:
    """Few rows: the fp8 GEMV (weight-only, bf16 x) at several (block_n, block_k) tiles against
    W8A8 through torch._scaled_mm (including the per-token quantization of x), µs a call
    replayed from a CUDA graph, weights cycled past L2. GB/s counts the fp8 weight bytes of the
    best. (A Triton fp8 tensor-core kernel for 1-16 rows, tried on 2026-11-30, lost to the GEMV
    at one row and to weight-only quant_matmul at 4-16: 1.3-1.7x slower for o and down.)"""
    print("\nfp8 at few rows, µs a call (CUDA graph replay)\n")
    for name, (n, k) in LINEAR_SHAPES.items():
        copies = max(2, math.ceil(L2_DEFEAT_BYTES / (n * k)))
        fp8 = [QUANT_WEIGHTS["fp8"](n, k) for _ in range(copies)]
        bf16 = [torch.randn(n, k, device="cuda", dtype=DTYPE) for _ in range(max(2, copies // 2))]
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            fns = {"bf16": (lambda w: bf16_linear(x, w), bf16)}
            if rows <= GEMV_MAX_ROWS:
                for bn, bk in FP8_GEMV_TILES:
                    fns[f"gemv {bn}x{bk}"] = (lambda cs, bn=bn, bk=bk: rowscaled_gemv(x, *cs, bn, bk), fp8)
            fns["scaled_mm"] = (lambda cs: fp8_linear(x, *cs), fp8)
            fns["scaled_mm fast"] = (lambda cs: fp8_linear(x, *cs, fast_accum=True), fp8)
            times = {}
            for label, (fn, ws) in fns.items():
                try:
                    times[label] = 1e3 * _graph_ms(_cycled(fn, ws))
                except Exception as e:  # a config that does not compile here: say so, go on
                    print(f"  {label} {name} M={rows}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            ok = {kk: v for kk, v in times.items() if kk != "bf16" and v == v}
            best = min(ok, key=ok.get)
            row = "  ".join(f"{kk} {v:.1f}" for kk, v in times.items())
            print(f"{name:<8} M={rows:<3} best {best} {ok[best]:.1f} µs ({n * k / ok[best] / 1e3:.0f} GB/s, "
                  f"{times['bf16'] / ok[best]:.2f}x bf16) | {row}")


@dataclass
class Fusion:
    """One fused kernel against the separate kernels it replaces (both Triton), timed in µs."""
    name: str
    fused: Callable[[], object]
    separate: Callable[[], object]


def rotary_kv_fusion(batch: int) -> Fusion:
    """A decode step's rotary + KV write of one layer: rotary_store_kv against apply_rotary then
    store_kv_cache, on q/k/v viewed out of one fused QKV output as the model passes them."""
    qkv = torch.randn(batch, (HQ + 2 * HKV) * HEAD_DIM, device="cuda", dtype=DTYPE)
    widths = [HQ * HEAD_DIM, HKV * HEAD_DIM, HKV * HEAD_DIM]
    q, k, v = (x.unflatten(-1, (-1, HEAD_DIM)) for x in qkv.split(widths, dim=-1))
    pos = torch.randint(0, 8192, (batch,), device="cuda")
    inv = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv)
    cos, sin = freqs.cos(), freqs.sin()
    num_blocks = math.ceil(batch / BLOCK_SIZE) * 4
    k_cache = torch.zeros(num_blocks, HKV, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:batch]

    def separate() -> None:
        _, k_rot = apply_rotary(q, k, pos, cos, sin)
        store_kv_cache(k_rot, v, k_cache, v_cache, slots)

    return Fusion(f"rotary+store_kv decode B={batch}",
                  lambda: rotary_store_kv(q, k, v, pos, cos, sin, k_cache, v_cache, slots), separate)


def print_fusions(fusions: list[Fusion]) -> None:
    # In a graph-captured decode step the launch and tail of each small kernel is most of its
    # cost, so the graph column is the one the engine's step time sees.
    print("\nfused vs separate Triton kernels, µs a call: eager (do_bench) and replayed from a CUDA graph\n")
    header = f"{'case':<36}{'fused':>9}{'separate':>10}{'graph fused':>13}{'graph sep.':>12}{'saved':>8}"
    print(header)
    print("-" * len(header))
    for f in fusions:
        e_f, e_s = 1e3 * _ms(f.fused), 1e3 * _ms(f.separate)
        g_f, g_s = 1e3 * _graph_ms(f.fused), 1e3 * _graph_ms(f.separate)
        print(f"{f.name:<36}{e_f:>9.2f}{e_s:>10.2f}{g_f:>13.2f}{g_s:>12.2f}{g_s - g_f:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--fp8", action="store_true", help="only the fp8 W8A8 table")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    roof = copy_gbps()
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, {DTYPE}")
    print(f"# device-to-device copy (1 GiB, read + write): {roof:.0f} GB/s\n")
    if args.fp8:
        fp8_small_table(FP8_SMALL_ROWS)
        fp8_table(FP8_ROWS)
        return

    cases: list[Case] = []
    for tokens in ([16] if args.quick else [16, 4096]):
        cases += elementwise_cases(tokens)
    for batch, context in ([(8, 2048)] if args.quick else [(1, 8192), (8, 2048), (64, 1024), (64, 4096)]):
        cases.append(decode_case(batch, context))
    cases.append(mixed_case([(2048, 2048)], "prefill 1x2048"))
    cases += linear_cases([1] if args.quick else [1, 4])
    cases += quant_linear_cases([1, 16] if args.quick else [1, GEMV_MAX_ROWS, *QUANT_CHUNK_ROWS],
                                sweep=not args.quick)
    if not args.quick:
        cases.append(mixed_case([(512, 4096)] + [(1, 1024)] * 32, "chunk 512@4096 + 32 decodes"))
        cases.append(mixed_case([(1, 2048)] * 64, "mixed kernel, 64 decodes ctx 2048"))

    print("triton ms / torch ms: triton.testing.do_bench (eager launches, L2 flushed); graph ms:")
    print("the Triton call replayed from a CUDA graph. GB/s, % copy and TFLOP/s use triton ms.\n")
    header = (f"{'case':<36}{'triton ms':>11}{'graph ms':>10}{'torch ms':>11}{'speedup':>9}"
              f"{'GB/s':>8}{'% copy':>8}{'TFLOP/s':>9}")
    print(header)
    print("-" * len(header))
    for case in cases:
        t_ms = _ms(case.kernel)
        g_ms = _graph_ms(case.kernel)
        r_ms = _ms(case.reference)
        gbps = case.bytes_moved / t_ms / 1e6
        tflops = f"{case.flops / t_ms / 1e9:9.1f}" if case.flops else ""
        print(f"{case.name:<36}{t_ms:>11.4f}{g_ms:>10.4f}{r_ms:>11.4f}{r_ms / t_ms:>8.2f}x"
              f"{gbps:>8.0f}{100 * gbps / roof:>7.0f}%{tflops}")
    print_fusions([rotary_kv_fusion(batch) for batch in ([1] if args.quick else [1, 64])])


if __name__ == "__main__":
    main()

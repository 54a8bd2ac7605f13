"""GPU micro-benchmark of the quantized linears on Llama-3.1-8B layer shapes, µs a call replayed
from a CUDA graph (what a graph-captured decode step pays), weights cycled past L2.

    python -m kernels.bench_quant            # every table
    python -m kernels.bench_quant --gemv     # one row only: int4 / fp8 GEMV tiles against bf16

Tables: (1) one row: the int4 GEMV at several (block_n, block_k) tiles and the fp8 GEMV
at several tiles, against bf16 as the engine runs it (kernels.linear: its GEMV); GB/s counts the
weight bytes read. (2) int4 at 2-64 rows: the GEMV and quant_matmul against bf16 cuBLAS. (3)
many rows: bf16 cuBLAS, fp8 W8A8, int8 W8A8, int4 (as int4_linear dispatches). The copy
bandwidth of the same run is printed first: the roofline each GB/s is a share of.
"""

from __future__ import annotations

import argparse
import math

import torch

import kernels
from framework.layers.quantization.int4 import int4_linear
from kernels.bench import L2_DEFEAT_BYTES, LINEAR_SHAPES, _cycled, _graph_ms, copy_gbps
from kernels.fp8_linear import fp8_linear
from kernels.int8_linear import gemm_tile, int8_gemm, int8_linear, quantize_rows_int8
from kernels.quant_gemv import int4_gemv, rowscaled_gemv
from kernels.quant_matmul import quant_matmul

DTYPE = torch.bfloat16
# (block_n, block_k, num_warps) of the int4 GEMV; the engine runs the first
INT4_GEMV_CONFIGS = [(16, 2048, 4), (8, 4096, 4), (8, 2048, 4), (32, 1024, 4), (32, 2048, 8), (16, 4096, 8)]
# (block_n, block_k, num_warps) of the one-row fp8 GEMV; the engine runs the first
FP8_GEMV_TILES = [(4, 2048, 4), (8, 2048, 4), (2, 4096, 4), (4, 4096, 8)]
INT4_ROWS = [2, 4, 8, 16, 64]
MANY_ROWS = [256, 2048]


def _int4(n: int, k: int):
    return (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"),
            (torch.rand(n, k // 128, device="cuda") * 0.01).to(DTYPE))


def _fp8(n: int, k: int):
    return (torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn), torch.rand(n, device="cuda") * 0.01)


def _int8(n: int, k: int):
    return (torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"), torch.rand(n, device="cuda") * 0.01)


def _copies(make, n: int, k: int, bytes_each: int) -> list:
    return [make(n, k) for _ in range(max(2, math.ceil(L2_DEFEAT_BYTES / bytes_each)))]


def _time(fn, weights) -> float:
    try:
        return 1e3 * _graph_ms(_cycled(fn, weights))
    except Exception as e:  # a config that does not compile here: say so, go on
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return float("nan")


def gemv_table(roof: float, fp8_tiles: list) -> None:
    print("\none row, µs a call; GB/s of the weight bytes, % of the copy rate")
    totals = {"bf16": 0.0, "int4": 0.0, "fp8": 0.0}
    for name, (n, k) in LINEAR_SHAPES.items():
        x = torch.randn(1, k, device="cuda", dtype=DTYPE)
        bf16 = _copies(lambda n, k: torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02, n, k, 2 * n * k)
        t_bf16 = _time(lambda w: kernels.linear(x, w), bf16)
        print(f"{name} {n}x{k}: bf16 {t_bf16:.1f} µs ({2 * n * k / t_bf16 / 1e3:.0f} GB/s, "
              f"{100 * 2 * n * k / t_bf16 / 1e3 / roof:.0f}%)")
        int4 = _copies(_int4, n, k, n * k // 2)
        best4 = (math.inf, None)
        for cfg in INT4_GEMV_CONFIGS:
            t = _time(lambda cs, cfg=cfg: int4_gemv(x, *cs, *cfg), int4)
            gbps = (n * k // 2 + n * k // 64) / t / 1e3
            print(f"  int4 gemv {cfg}: {t:.1f} µs ({gbps:.0f} GB/s, {100 * gbps / roof:.0f}%)")
            best4 = min(best4, (t, cfg), key=lambda p: p[0] if p[0] == p[0] else math.inf)
        fp8 = _copies(_fp8, n, k, n * k)
        best8 = (math.nan, None)
        for tile in fp8_tiles:
            t = _time(lambda cs, tile=tile: rowscaled_gemv(x, *cs, *tile), fp8)
            print(f"  fp8 gemv {tile}: {t:.1f} µs ({n * k / t / 1e3:.0f} GB/s, {100 * n * k / t / 1e3 / roof:.0f}%)")
            best8 = min(best8, (t, tile), key=lambda p: p[0] if p[0] == p[0] else math.inf)
        print(f"  best: int4 {best4[1]} {best4[0]:.1f} µs ({t_bf16 / best4[0]:.2f}x bf16), "
              f"fp8 {best8[1]} {best8[0]:.1f} µs ({t_bf16 / best8[0]:.2f}x bf16)")
        totals["bf16"] += t_bf16
        totals["int4"] += best4[0]
        totals["fp8"] += best8[0]
    print(f"a layer's four linears at their best tiles: bf16 {totals['bf16']:.1f} µs, int4 {totals['int4']:.1f} "
          f"({totals['bf16'] / totals['int4']:.2f}x), fp8 {totals['fp8']:.1f} ({totals['bf16'] / totals['fp8']:.2f}x)")


def int4_rows_table(rows_list: list) -> None:
    print("\nint4 at few rows, µs a call: bf16 cuBLAS | int4 GEMV (default tile; <= 8 rows) | quant_matmul "
          "block_n 64")
    for name, (n, k) in LINEAR_SHAPES.items():
        bf16 = _copies(lambda n, k: torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02, n, k, 2 * n * k)
        int4 = _copies(_int4, n, k, n * k // 2)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            t_bf16 = _time(lambda w: torch.nn.functional.linear(x, w), bf16)
            t_gemv = _time(lambda cs: int4_gemv(x, *cs), int4) if rows <= 8 else float("nan")
            t64 = _time(lambda cs: quant_matmul(x, *cs, block_n=64), int4)
            best = min(t for t in (t_gemv, t64) if t == t)
            print(f"{name:<8} M={rows:<3} bf16 {t_bf16:7.1f} | gemv {t_gemv:7.1f} | qmm64 {t64:7.1f} | "
                  f"best {t_bf16 / best:.2f}x bf16")


def many_rows_table(rows_list: list) -> None:
    print("\nmany rows, µs a call: bf16 cuBLAS | fp8 W8A8 | int8 W8A8 | int4 as dispatched | int4 quant_matmul")
    for name, (n, k) in LINEAR_SHAPES.items():
        bf16 = _copies(lambda n, k: torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02, n, k, 2 * n * k)
        fp8, int8, int4 = _copies(_fp8, n, k, n * k), _copies(_int8, n, k, n * k), _copies(_int4, n, k, n * k // 2)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            t = [_time(lambda w: torch.nn.functional.linear(x, w), bf16),
                 _time(lambda cs: fp8_linear(x, *cs), fp8),
                 _time(lambda cs: int8_linear(x, *cs), int8),
                 _time(lambda cs: int4_linear(x, *cs, None), int4),
                 _time(lambda cs: quant_matmul(x, *cs, block_n=128), int4)]
            print(f"{name:<8} M={rows:<5}" + " | ".join(f"{v:8.1f}" for v in t)
                  + "   x bf16: " + " ".join(f"{t[0] / v:.2f}" for v in t[1:]))


INT8_TILES = [(128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3)]


def int8_table(rows_list: list) -> None:
    """int8 W8A8 at many rows: the Triton GEMM (default tile, then INT8_TILES) against cuBLASLt's
    int8 GEMM + the epilogue pass, bf16 cuBLAS and fp8 W8A8; µs a call (x's quantization included)."""
    print("\nint8 W8A8, µs a call: bf16 cuBLAS | fp8 W8A8 | int8 cuBLASLt + epilogue | int8 Triton (default tile) "
          "| best of INT8_TILES")
    for name, (n, k) in LINEAR_SHAPES.items():
        bf16 = _copies(lambda n, k: torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02, n, k, 2 * n * k)
        fp8, int8 = _copies(_fp8, n, k, n * k), _copies(_int8, n, k, n * k)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            t = [_time(lambda w: torch.nn.functional.linear(x, w), bf16),
                 _time(lambda cs: fp8_linear(x, *cs), fp8),
                 _time(lambda cs: int8_linear(x, *cs, gemm="cublas"), int8),
                 _time(lambda cs: int8_linear(x, *cs), int8)]
            tiles = {}
            for tile in INT8_TILES:
                def fn(cs, tile=tile):
                    xq, xs = quantize_rows_int8(x)
                    return int8_gemm(xq, xs, cs[0], cs[1], None, x.dtype, tile=tile)
                tiles[tile] = _time(fn, int8)
            best = min(tiles, key=lambda tl_: tiles[tl_] if tiles[tl_] == tiles[tl_] else math.inf)
            print(f"{name:<8} M={rows:<5}" + " | ".join(f"{v:7.1f}" for v in t) + f" | {tiles[best]:7.1f} {best}"
                  + "   x bf16: " + " ".join(f"{t[0] / v:.2f}" for v in t[1:] + [tiles[best]])
                  + f"   default {gemm_tile(rows, n, x.device)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemv", action="store_true", help="one row only")
    parser.add_argument("--quick", action="store_true", help="int4 only, fewer row counts")
    parser.add_argument("--int8", action="store_true", help="the int8 W8A8 table only")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    roof = copy_gbps()
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
          f"device copy {roof:.0f} GB/s")
    if args.int8:
        int8_table([64, 256, 2048])
        return
    gemv_table(roof, [] if args.quick else FP8_GEMV_TILES)
    if not args.gemv:
        int4_rows_table([16, 64] if args.quick else INT4_ROWS)
        many_rows_table([256] if args.quick else MANY_ROWS)


if __name__ == "__main__":
    main()

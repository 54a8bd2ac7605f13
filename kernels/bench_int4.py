"""GPU micro-benchmark of the int4 linears at every row count on Llama-3.1-8B layer shapes, µs a
call replayed from a CUDA graph, weights cycled past L2; bf16 as the engine runs it alongside.

    python -m kernels.bench_int4             # check tinygemm's format, rows table, tile sweep
    python -m kernels.bench_int4 --rows      # the rows table only
    python -m kernels.bench_int4 --pick F    # tile sweep only; the best tile per row count into F (json)
    python -m kernels.bench_int4 --dequant   # where int4_linear's DEQUANT_ROWS should be

Tables: (1) tinygemm (`aten._weight_int4pack_mm`) against our reference, both nibble orders
(the packing convention, checked on the card). (2) rows 1-256: bf16 (the engine's GEMV at one
row, else cuBLAS), our GEMV (1 row), the MMA GEMV (1-8 rows, kernels/int4_mma_gemv.py), quant_matmul
(2-64), tinygemm at inner k-tiles 2/4/8, w4a16_matmul at its default tile. (3) w4a16_matmul's tiles
at many rows against bf16 cuBLAS and the one-pass unpack + cuBLAS.
(4, `--dequant`) 256-8,192 rows: bf16 cuBLAS, w4a16_matmul at the engine's tile, the unpack alone and
unpack + cuBLAS, a layer's four linears summed: the two int4 paths cross near DEQUANT_ROWS.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch
import torch.nn.functional as F

import kernels
from framework.layers.quantization.int4 import DEQUANT_ROWS
from kernels import int4_tinygemm as tg
from kernels.bench import L2_DEFEAT_BYTES, LINEAR_SHAPES, _cycled, _graph_ms, copy_gbps
from kernels.int4_mma_gemv import MAX_ROWS, int4_mma_gemv
from kernels.quant_gemv import int4_gemv
from kernels.quant_matmul import dequantize_int4, quant_matmul, quant_matmul_ref
from kernels.w4a16_matmul import DEFAULT_TILE, Tile, tile_for, w4a16_matmul

DTYPE = torch.bfloat16
GROUP = 128
ROWS = [1, 4, 8, 16, 64, 256]
SWEEP_ROWS = [256, 2048]
DEQUANT_TABLE_ROWS = [256, 512, 1024, 2048, 8192]
# the two best of the first sweep (nibbles joined), then x split into even / odd columns
TILES = [Tile(128, 128, 128, True, 8, 3), Tile(256, 128, 64, True, 8, 3),
         Tile(128, 128, 128, True, 8, 3, split_x=True), Tile(256, 128, 128, True, 8, 3, split_x=True),
         Tile(128, 128, 64, True, 8, 4, split_x=True), Tile(64, 128, 128, True, 4, 4, split_x=True),
         Tile(128, 64, 128, True, 4, 3, split_x=True)]


def _time(fn, weights) -> float:
    try:
        return 1e3 * _graph_ms(_cycled(fn, weights))
    except Exception as e:  # a config that does not compile or run here: say so, go on
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return float("nan")


def _weights(n: int, k: int) -> dict:
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scale = (torch.rand(n, k // GROUP, device="cuda") * 0.01 + 0.001).to(DTYPE)
    w = {"codes": codes, "scale": scale, "sz": tg.scale_zeros(scale)}
    for inner in (2, 4, 8):
        w[inner] = tg.pack(codes, inner)
    return w


def _copies(make, n: int, k: int, nbytes: int) -> list:
    return [make(n, k) for _ in range(max(2, math.ceil(L2_DEFEAT_BYTES / nbytes)))]


def check_tinygemm() -> None:
    print("\ntinygemm against quant_matmul_ref (rel. error; bf16 rounding is ~4e-3)")
    n, k = 256, 1024
    w = _weights(n, k)
    x = torch.randn(16, k, device="cuda", dtype=DTYPE)
    ref = quant_matmul_ref(x.float(), w["codes"], w["scale"].float())
    for inner in (2, 4, 8):
        ours = tg.int4pack_mm(x, w[inner], w["sz"], GROUP).float()
        raw = torch.ops.aten._convert_weight_to_int4pack(w["codes"], inner)  # unswapped nibbles
        other = tg.int4pack_mm(x, raw, w["sz"], GROUP).float()
        print(f"  inner {inner}: swapped (ours) {((ours - ref).norm() / ref.norm()).item():.2e}, "
              f"unswapped {((other - ref).norm() / ref.norm()).item():.2e}")
    for m in (1, 65, 300):
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        ref = quant_matmul_ref(x.float(), w["codes"], w["scale"].float())
        got = w4a16_matmul(x, w["codes"], w["scale"]).float()
        print(f"  w4a16_matmul M={m}: {((got - ref).norm() / ref.norm()).item():.2e}")


def rows_table(rows_list: list) -> None:
    print("\nint4 by rows, µs a call: bf16 | gemv | mma gemv | qmm | tg2 | tg4 | tg8 | w4a16 (default tile)"
          " -> best int4 x bf16")
    for name, (n, k) in LINEAR_SHAPES.items():
        bf16 = _copies(lambda n, k: torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02, n, k, 2 * n * k)
        int4 = _copies(_weights, n, k, n * k // 2)
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            t = {"bf16": _time(lambda w: kernels.linear(x, w), bf16),
                 "gemv": _time(lambda w: int4_gemv(x, w["codes"], w["scale"]), int4) if m == 1 else math.nan,
                 "mma": _time(lambda w: int4_mma_gemv(x, w["codes"], w["scale"]), int4) if m <= MAX_ROWS else math.nan,
                 "qmm": _time(lambda w: quant_matmul(x, w["codes"], w["scale"]), int4) if 1 < m <= 64 else math.nan}
            for inner in (2, 4, 8):
                t[f"tg{inner}"] = _time(lambda w, i=inner: tg.int4pack_mm(x, w[i], w["sz"], GROUP), int4)
            t["w4a16"] = _time(lambda w: w4a16_matmul(x, w["codes"], w["scale"]), int4) if m >= 64 else math.nan
            best = min((v, key) for key, v in t.items() if key != "bf16" and v == v)
            print(f"{name:<8} M={m:<4}" + " | ".join(f"{v:7.1f}" for v in t.values())
                  + f"  -> {best[1]} {t['bf16'] / best[0]:.2f}x")


def tile_sweep(rows_list: list) -> dict:
    """µs of each tile summed over the four shapes, per row count: {rows: [total per tile]}."""
    print("\nw4a16_matmul tiles, µs a call (x bf16 cuBLAS); K split to fill the SMs where tiles are few")
    totals = {m: [0.0] * len(TILES) for m in rows_list}
    for name, (n, k) in LINEAR_SHAPES.items():
        bf16 = _copies(lambda n, k: torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02, n, k, 2 * n * k)
        int4 = _copies(_weights, n, k, n * k // 2)
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            base = _time(lambda w: F.linear(x, w), bf16)
            unpack = _time(lambda w: F.linear(x, dequantize_int4(w["codes"], w["scale"], DTYPE)), int4)
            cells = [f"unpack+cuBLAS {unpack:6.1f} ({base / unpack:.2f})"]
            for i, tile in enumerate(TILES):
                v = _time(lambda w, tile=tile: w4a16_matmul(x, w["codes"], w["scale"], tile), int4)
                totals[m][i] += v if v == v else math.inf
                cells.append(f"{v:6.1f} ({base / v:.2f})")
            print(f"{name:<8} M={m:<5} bf16 {base:6.1f} | " + " | ".join(cells))
    print("tiles: " + "; ".join(f"{i}: {t.block_m}x{t.block_n}x{t.block_k} w_first={t.w_first} split_x={t.split_x} "
                                f"warps={t.num_warps} stages={t.num_stages}" for i, t in enumerate(TILES)))
    for m, row in totals.items():
        print(f"M={m}: a layer's four linears per tile: " + " ".join(f"{v:.1f}" for v in row))
    return totals


def dequant_table(rows_list: list) -> None:
    print(f"\nprefill-sized int4, µs a layer's four linears: bf16 cuBLAS | w4a16_matmul (tile_for) | unpack alone | "
          f"unpack + cuBLAS (int4_linear switches at DEQUANT_ROWS = {DEQUANT_ROWS})")
    totals = {m: [0.0] * 4 for m in rows_list}
    for name, (n, k) in LINEAR_SHAPES.items():
        bf16 = _copies(lambda n, k: torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02, n, k, 2 * n * k)
        int4 = _copies(_weights, n, k, n * k // 2)
        unpack = _time(lambda w: dequantize_int4(w["codes"], w["scale"], DTYPE), int4)
        print(f"{name:<8} unpack {unpack:.1f} µs ({n * k * (2.5 + 2 / GROUP) / unpack / 1e3:.0f} GB/s)")
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            t = [_time(lambda w: F.linear(x, w), bf16),
                 _time(lambda w: w4a16_matmul(x, w["codes"], w["scale"], tile_for(GROUP)), int4), unpack,
                 _time(lambda w: F.linear(x, dequantize_int4(w["codes"], w["scale"], DTYPE)), int4)]
            totals[m] = [a + b for a, b in zip(totals[m], t)]
            print(f"{name:<8} M={m:<5} " + " | ".join(f"{v:7.1f}" for v in t))
    for m, (bf16, w4, unpack, both) in totals.items():
        print(f"a layer M={m:<5} bf16 {bf16:.1f} | w4a16 {w4:.1f} ({bf16 / w4:.2f}x) | unpack {unpack:.1f} | "
              f"unpack + cuBLAS {both:.1f} ({bf16 / both:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="store_true", help="the rows table only")
    parser.add_argument("--pick", help="tile sweep only, and write the best tile per row count to this json file")
    parser.add_argument("--dequant", action="store_true", help="w4a16_matmul against unpack + cuBLAS only")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
          f"device copy {copy_gbps():.0f} GB/s; default w4a16 tile {DEFAULT_TILE}")
    if args.dequant:
        dequant_table(DEQUANT_TABLE_ROWS)
        return
    if args.pick:
        totals = tile_sweep(SWEEP_ROWS)
        best = {str(m): dataclasses.asdict(TILES[min(range(len(TILES)), key=row.__getitem__)])
                for m, row in totals.items()}
        print(f"picked: {best}")
        with open(args.pick, "w") as f:
            json.dump(best, f)
        return
    if not args.rows:
        check_tinygemm()
    rows_table(ROWS)
    if not args.rows:
        tile_sweep(SWEEP_ROWS)


if __name__ == "__main__":
    main()

"""fp8_mma_gemv (fp8 e4m3 weights with row scales, 1-8 rows, mma.sync through inline PTX). On CPU its
PTX runs on a numpy warp (tests/kernels/ptx_warp.py): every one of the 256 codes through the unpack,
and whole slabs against the exact products; its tile rule and where it is taken; on the card
(`-m gpu`) the kernel against the exact products and the one-row GEMV, and the fp8 layers' dispatch."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from framework.layers.quantization.fp8 import dequantize_fp8, quantize_fp8
from kernels import fp8_mma_gemv as fmg
from tests.kernels.ptx_warp import Warp

HALF = {torch.bfloat16: "bf16", torch.float16: "f16"}


def _exact(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double().cpu() @ dequantize_fp8(codes.cpu(), scale.cpu(), torch.float64).T


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_ptx_operands_match_the_constraints(dtype):
    """Every $n the PTX names is one of the constraint list's operands, all of them used; the four
    outputs written; a slab is 4 words = 4 MMAs of x's dtype."""
    asm = fmg._asm(dtype)
    constraints = fmg.CONSTRAINTS.split(",")
    assert len(constraints) == 20 and {int(n) for n in re.findall(r"\$(\d+)", asm)} == set(range(20))
    assert [i for i, c in enumerate(constraints) if c.startswith("=")] == [0, 1, 2, 3]
    assert all(re.search(rf"mov\.f32 \${i}, c{i};", asm) for i in range(4))
    assert asm.count("mma.sync.aligned.m16n8k16") == 4 and asm.count(f".{dtype}.{dtype}.f32") == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_code_unpacks_to_its_value(dtype):
    """The slab's unpack of row g's first word (register a0: bytes 0, 1; a2: bytes 2, 3), run on all 256
    codes, gives each code's value in x's dtype bit for bit: subnormals, both zeros, the sign."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[codes & 0x7F != 0x7F]  # e4m3fn's two NaNs: never written by quantize_fp8
    half = HALF[dtype]
    asm = "\n".join(fmg._constants(half) + fmg._unpack("a0", "$4", 0, half) + fmg._unpack("a2", "$4", 1, half))
    chunks = torch.zeros(2, 128, dtype=torch.uint8)  # 32 lanes x one word (4 codes) each
    chunks.view(-1)[:len(codes)] = codes
    for chunk in chunks:
        warp = Warp(half, [chunk.view(torch.int32).numpy().view(np.uint32)])
        warp.run(asm)
        lane_halves = np.stack([warp.regs["a0"] & 0xFFFF, warp.regs["a0"] >> 16, warp.regs["a2"] & 0xFFFF,
                                warp.regs["a2"] >> 16], -1)
        want = chunk.view(fmg.FP8).to(dtype).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(lane_halves.reshape(-1).astype(np.uint16), want), chunk.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, fmg.MAX_ROWS])
def test_ptx_run_on_an_emulated_warp_matches_the_reference(dtype, rows):
    """The shipped PTX, run slab by slab with each lane's operands loaded as the kernel loads them
    (lane 4g + t: words 4t..4t+3 of the slab for rows g and g + 8, x's row g at the same columns),
    then the row scale, gives y = x @ W.T: the K permutation, fragment slots and accumulator layout."""
    k = 192
    gen = torch.Generator().manual_seed(rows)
    codes, scale = quantize_fp8(torch.randn(16, k, generator=gen) * 0.05)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    words = codes.view(torch.int32).numpy().view(np.uint32)  # [16, k / 4]
    x_int64 = torch.zeros(fmg.MAX_ROWS, k, dtype=dtype)
    x_int64[:rows] = x
    x_int64 = x_int64.view(torch.int64).numpy().view(np.uint64)  # [8, k / 4]: a word's four columns
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    acc = [np.zeros(32, np.uint32) for _ in range(4)]
    for slab in range(0, k // 4, 16):  # one warp's 64-column steps, words slab .. slab + 15
        word = [slab + 4 * t + u for u in range(4)]
        operands = ([words[g, w] for w in word] + [words[g + 8, w] for w in word]
                    + [x_int64[g, w] for w in word] + acc)
        warp = Warp(HALF[dtype], operands)
        warp.run(fmg._asm(warp.half))
        acc = [warp.regs[f"${i}"] for i in range(4)]
    y = np.zeros((fmg.MAX_ROWS, 16), np.float64)
    for u, (row, m) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
        y[m, row] = acc[u].view(np.float32) * scale.numpy()[row]
    torch.testing.assert_close(torch.from_numpy(y[:rows]), _exact(x, codes, scale), atol=1e-5, rtol=1e-5)


def test_tiles_and_warps_rule():
    # qkv, o, gate_up, down of Llama-3.1-8B: the tiles measured best on an H200 at 2-8 rows
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
    for m in (2, 8):
        assert [fmg.tiles_and_warps(m, n, k) for n, k in shapes] == [(1, 8), (1, 8), (2, 4), (1, 8)]
    assert fmg.tiles_and_warps(4, 48, 256) == (1, 2)  # short K: fewer warps, never below two
    assert fmg.tiles_and_warps(4, 8208, 4096) == (1, 8)  # 16 x 513 rows: no whole pair of tiles


def test_taken_for_two_to_eight_rows_of_short_k():
    codes = torch.zeros(64, 8192, dtype=fmg.FP8)
    assert [fmg.faster(torch.zeros(m, 8192), codes) for m in (1, 2, 8, 9)] == [False, True, True, False]
    assert not fmg.faster(torch.zeros(4, 14336), torch.zeros(64, 14336, dtype=fmg.FP8))


def test_not_taken_off_cuda():
    codes, scale = quantize_fp8(torch.randn(32, 256) * 0.05)
    assert not fmg.supported(torch.randn(1, 256, dtype=torch.bfloat16), codes, scale)


CASES = [(1024, 4096, 0, 0), (512, 14336, 2, 8), (256, 2048, 1, 4), (4096, 1536, 1, 16), (48, 640, 0, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,tiles,warps", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_references(n, k, tiles, warps, dtype):
    """K past the last full step of the warps (1,536, 640, 14,336 over 16 or 8 warps) is masked."""
    from kernels.quant_gemv import rowscaled_gemv

    gen = torch.Generator().manual_seed(n + k)
    codes, scale = quantize_fp8(torch.randn(n, k, generator=gen) * 0.05)
    codes, scale = codes.cuda(), scale.cuda()
    for rows in (1, 3, fmg.MAX_ROWS):
        x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
        assert fmg.supported(x, codes, scale)
        got = fmg.fp8_mma_gemv(x, codes, scale, tiles, warps)
        assert got.dtype == dtype and got.shape == (rows, n)
        torch.testing.assert_close(got.double().cpu(), _exact(x, codes, scale), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got, rowscaled_gemv(x, codes, scale), atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rows_and_columns_land_where_they_belong(dtype):
    """x's rows are unit vectors and the scales 1: output row m is column m of the codes, exactly,
    every one of the 254 finite codes included, so any lane, register or unpack slip shows."""
    codes = torch.arange(64 * 512, dtype=torch.int32).mul(7).remainder(256).to(torch.uint8).view(64, 512)
    codes[codes & 0x7F == 0x7F] = 0x3F
    codes = codes.view(fmg.FP8)
    scale = torch.ones(64)
    weight = codes.to(dtype)
    for first in (0, 70, 504):  # columns in different slabs, words and bytes
        for tiles in (1, 2):
            x = torch.zeros(fmg.MAX_ROWS, 512, dtype=dtype)
            x[torch.arange(fmg.MAX_ROWS), first + torch.arange(fmg.MAX_ROWS)] = 1
            got = fmg.fp8_mma_gemv(x.cuda(), codes.cuda(), scale.cuda(), tiles).cpu()
            assert torch.equal(got, weight[:, first:first + fmg.MAX_ROWS].T)


@pytest.mark.gpu
def test_gpu_fp8_layers_take_it_for_two_to_eight_rows(monkeypatch):
    """1 row takes the GEMV, 2-8 rows this kernel, 9 the next weight-only path (quant_matmul); and
    K past MAX_K quant_matmul too."""
    import kernels.quant_gemv as qg
    import kernels.quant_matmul as qmm
    from framework.layers.quantization import int8

    calls = []
    for module, name in ((fmg, "fp8_mma_gemv"), (qmm, "quant_matmul"), (qg, "rowscaled_gemv")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    for k, rows_list in ((1024, (1, 2, 5, 8, 9)), (fmg.MAX_K + 64, (4,))):
        codes, scale = quantize_fp8(torch.randn(96, k) * 0.05)
        codes, scale = codes.cuda(), scale.cuda()
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            torch.testing.assert_close(int8.scaled_linear(x, codes, scale, None).double().cpu(),
                                       _exact(x, codes, scale), atol=3e-2, rtol=2e-2)
    assert calls == ["rowscaled_gemv"] + ["fp8_mma_gemv"] * 3 + ["quant_matmul"] * 2

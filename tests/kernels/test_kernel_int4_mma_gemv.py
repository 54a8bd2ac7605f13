"""int4_mma_gemv (int4 weights, 1-8 rows, mma.sync through inline PTX). The interpreter runs no PTX, so
on CPU its PTX runs on a small numpy warp (the instructions it uses, mma.sync's fragment layout) with
operands placed as the kernel loads them; on the card (`-m gpu`) the kernel against the exact products
and quant_matmul_ref, and int4_linear's dispatch. Also its operand list and warp rule."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from framework.layers.quantization.int4 import dequantize_int4, quantize_int4
from kernels import int4_mma_gemv as mg
from kernels.quant_matmul import quant_matmul_ref
from tests.kernels.ptx_warp import Warp


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_ptx_operands_match_the_constraints(dtype):
    """Every $n the PTX names is one of the constraint list's operands; every word, x and accumulator
    operand is read (of each row's four scales, copies of one value, the first two), each of the four
    outputs written; a slab is 4 words x 2 k16 chunks = 8 MMAs."""
    asm = mg._asm(dtype)
    constraints = mg.CONSTRAINTS.split(",")
    used = {int(n) for n in re.findall(r"\$(\d+)", asm)}
    assert len(constraints) == 32 and used == set(range(32)) - {22, 23, 26, 27}
    outputs = [i for i, c in enumerate(constraints) if c.startswith("=")]
    assert outputs == [0, 1, 2, 3]
    assert all(re.search(rf"fma\.rn\.f32 \${i},", asm) for i in outputs)
    assert asm.count("mma.sync.aligned.m16n8k16") == 8 and asm.count(f".{dtype}.{dtype}.f32") == 8


def _exact(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double().cpu() @ dequantize_int4(codes.cpu(), scale.cpu(), torch.float64).T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, mg.MAX_ROWS])
def test_ptx_run_on_an_emulated_warp_matches_the_reference(dtype, rows):
    """The shipped PTX, run slab by slab with each lane's operands loaded as the kernel loads them
    (lane 4g + t: words 4t..4t+3 of the slab for rows g and g + 8, x's row g at the same columns),
    gives y = x @ W.T: checks the K permutation, the fragment slots and the accumulator layout on CPU."""
    k, group = 256, 128
    gen = torch.Generator().manual_seed(rows)
    codes, scale = quantize_int4(torch.randn(16, k, generator=gen) * 0.05, group, dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    words = codes.view(torch.int32).numpy().view(np.uint32)  # [16, k / 8]
    x_int64 = torch.zeros(mg.MAX_ROWS, k, dtype=dtype)
    x_int64[:rows] = x
    x_int64 = x_int64.view(torch.int64).numpy().view(np.uint64)  # [8, k / 4]: four columns each
    s32 = scale.float().numpy().view(np.uint32)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    acc = [np.zeros(32, np.uint32) for _ in range(4)]
    for slab in range(0, k // 8, 16):  # one warp's 128-column steps, words slab .. slab + 15
        word = [slab + 4 * t + u for u in range(4)]
        operands = ([words[g, w] for w in word] + [words[g + 8, w] for w in word]
                    + [x_int64[g, 2 * w] for w in word] + [x_int64[g, 2 * w + 1] for w in word]
                    + [s32[g, slab * 8 // group]] * 4 + [s32[g + 8, slab * 8 // group]] * 4 + acc)
        warp = Warp("bf16" if dtype == torch.bfloat16 else "f16", operands)
        warp.run(mg._asm(warp.half))
        acc = [warp.regs[f"${i}"] for i in range(4)]
    y = np.zeros((mg.MAX_ROWS, 16), np.float32)
    for u, (row, m) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
        y[m, row] = acc[u].view(np.float32)
    torch.testing.assert_close(torch.from_numpy(y[:rows]).double(), _exact(x, codes, scale), atol=1e-5, rtol=1e-5)


def test_tiles_and_warps_for_the_8b_shapes():
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # qkv, o, gate_up, down
    for m in (1, 2):
        assert [mg.tiles_and_warps(m, n, k) for n, k in shapes] == [(1, mg.warps_for(n, k)) for n, k in shapes]
    # more rows: two tiles a warp, the warps measured best at eight rows on an H200
    assert [mg.tiles_and_warps(8, n, k) for n, k in shapes] == [(2, 4), (2, 8), (2, 2), (2, 8)]
    assert mg.tiles_and_warps(8, 48, 1024) == (1, 4)  # 48 rows: no whole pair of 16-row tiles


def test_warps_for_the_8b_shapes():
    # qkv, o, gate_up, down of Llama-3.1-8B: the tile sizes measured best on an H200
    assert [mg.warps_for(n, k) for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))] == [8, 8, 4, 16]
    assert mg.warps_for(64, 256) == 4  # never fewer than four
    for n, k in ((16, 128), (4096, 2048), (1024, 1 << 20)):
        assert mg.warps_for(n, k) in (4, 8, 16)


def test_not_taken_off_cuda():
    codes, scale = quantize_int4(torch.randn(32, 256) * 0.05, 128, torch.bfloat16)
    assert not mg.supported(torch.randn(1, 256, dtype=torch.bfloat16), codes, scale)


CASES = [(1024, 4096, 128, 0, 0), (512, 14336, 128, 2, 8), (256, 2048, 256, 1, 4), (4096, 1536, 128, 1, 16),
         (48, 640, 128, 0, 0), (96, 1024, 128, 2, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group,tiles,warps", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_references(n, k, group, tiles, warps, dtype):
    """K past the last full step of the warps (1,536, 640, 14,336 over 16 or 8 warps) is masked."""
    gen = torch.Generator().manual_seed(n + k)
    codes, scale = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group, dtype)
    codes, scale = codes.cuda(), scale.cuda()
    for rows in (1, 3, mg.MAX_ROWS):
        x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
        assert mg.supported(x, codes, scale)
        got = mg.int4_mma_gemv(x, codes, scale, tiles, warps)
        assert got.dtype == dtype and got.shape == (rows, n)
        torch.testing.assert_close(got.double().cpu(), _exact(x, codes, scale), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got, quant_matmul_ref(x, codes, scale), atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_rows_and_columns_land_where_they_belong():
    """x's rows are unit vectors: output row m is column m of the weight, rounded once to bf16
    ((q - 8) * scale is exact in float32), so any lane or register mix-up shows as inequality."""
    codes, scale = quantize_int4(torch.randn(64, 512) * 0.05, 128, torch.bfloat16)
    weight = dequantize_int4(codes, scale, torch.float32).to(torch.bfloat16)
    for first in (0, 130, 504):  # columns in different slabs, words and nibbles
        for tiles in (1, 2):
            x = torch.zeros(mg.MAX_ROWS, 512, dtype=torch.bfloat16)
            x[torch.arange(mg.MAX_ROWS), first + torch.arange(mg.MAX_ROWS)] = 1
            got = mg.int4_mma_gemv(x.cuda(), codes.cuda(), scale.cuda(), tiles).cpu()
            assert torch.equal(got, weight[:, first:first + mg.MAX_ROWS].T)


@pytest.mark.gpu
def test_gpu_int4_linear_takes_it_for_up_to_eight_rows(monkeypatch):
    """1-8 rows take this kernel, 9 the next path (quant_matmul); a layer with the opt-in tinygemm
    copy keeps tinygemm for 2-4 rows."""
    import kernels.int4_tinygemm as tg
    import kernels.quant_matmul as qmm
    from framework.layers.quantization import int4

    calls = []
    for module, name in ((mg, "int4_mma_gemv"), (qmm, "quant_matmul"), (tg, "int4pack_mm")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    codes, scale = quantize_int4(torch.randn(96, 1024) * 0.05, 128, torch.bfloat16)
    codes, scale = codes.cuda(), scale.cuda()
    for rows in (1, 5, 8, 9):
        x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(int4.int4_linear(x, codes, scale, None), quant_matmul_ref(x, codes, scale),
                                   atol=3e-2, rtol=2e-2)
    assert calls == ["int4_mma_gemv"] * 3 + ["quant_matmul"]
    calls.clear()
    copy = (tg.pack(codes), tg.scale_zeros(scale))
    for rows in (1, 3):
        int4.int4_linear(torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda"), codes, scale, None, copy)
    assert calls == ["int4_mma_gemv", "int4pack_mm"]

"""w4a16_matmul (int4 weights, many rows) against quant_matmul_ref, both tile orientations."""

from __future__ import annotations

import pytest
import torch

from framework.layers.quantization.int4 import quantize_int4
from kernels.quant_matmul import quant_matmul_ref
from kernels.w4a16_matmul import Tile, split_for, supported, w4a16_matmul

# small tiles: the interpreter is slow. M and N are no multiples of the tiles (the edge wraps).
TILES = [Tile(16, 32, 32, True, 4, 2, group_m=2, split=1), Tile(32, 16, 32, False, 4, 2, group_m=1, split=2),
         Tile(16, 16, 32, True, 4, 2, split_x=True, split=1)]
CASES = [(37, 40, 128, 32), (20, 72, 256, 64)]


@pytest.mark.parametrize("tile", TILES, ids=["w_first", "x_first_split", "split_x"])
@pytest.mark.parametrize("m,n,k,group", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(tile, m, n, k, group, dtype, device):
    gen = torch.Generator().manual_seed(m + n)
    codes, scale = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group, dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    got = w4a16_matmul(x.to(device), codes.to(device), scale.to(device), tile).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, quant_matmul_ref(x, codes, scale), atol=tol, rtol=tol)


def test_split_keeps_one_wave_with_whole_steps():
    assert split_for(tiles=64, k=14336, block_k=128, sms=132) == 2  # the 8B's down projection, 256 rows
    assert split_for(tiles=96, k=4096, block_k=128, sms=132) == 1  # qkv: a second wave costs what the split saves
    assert split_for(tiles=448, k=4096, block_k=128, sms=132) == 1
    assert split_for(tiles=8, k=384, block_k=64, sms=132) == 2  # 384 = 3 x 128: no split of 4
    assert split_for(tiles=8, k=4096, block_k=64, sms=132) == 8


def test_int4_linear_takes_this_kernel_below_dequant_rows_then_the_unpack(force_triton, device, monkeypatch):
    """int4_linear (group 128) sends 65 to DEQUANT_ROWS - 1 rows here, from DEQUANT_ROWS rows it
    unpacks the weight for one matmul; both agree with the reference."""
    import kernels.quant_matmul as qmm
    import kernels.w4a16_matmul as w4
    from framework.layers.quantization import int4

    calls = []
    for module, name in ((w4, "w4a16_matmul"), (qmm, "dequantize_int4")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setattr(w4, "MID_TILE", TILES[0])  # a small tile of K steps that divide 128: the interpreter
    monkeypatch.setattr(int4, "DEQUANT_ROWS", 80)  # the rule, at rows the interpreter runs quickly
    gen = torch.Generator().manual_seed(3)
    codes, scale = quantize_int4(torch.randn(40, 256, generator=gen) * 0.05, 128)
    for rows in (70, 80):
        x = torch.randn(rows, 256, generator=gen)
        got = int4.int4_linear(x.to(device), codes.to(device), scale.to(device), None).cpu()
        torch.testing.assert_close(got, quant_matmul_ref(x, codes, scale), atol=1e-5, rtol=1e-5)
    assert calls == ["w4a16_matmul", "dequantize_int4"]


def test_tile_by_group_size():
    from kernels.w4a16_matmul import GROUP64_TILE, MID_TILE, tile_for

    assert tile_for(128) is MID_TILE and tile_for(384) is MID_TILE
    assert tile_for(64) is GROUP64_TILE and tile_for(192) is GROUP64_TILE
    assert tile_for(32) is None  # int4_linear unpacks for cuBLAS instead


def test_group_must_hold_whole_steps():
    codes, scale = quantize_int4(torch.randn(8, 96), 48)
    assert not supported(codes, scale, 32) and supported(codes, scale, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [65, 256, 1000])
def test_bf16_on_gpu(m):
    gen = torch.Generator().manual_seed(m)
    codes, scale = quantize_int4(torch.randn(384, 512, generator=gen) * 0.05, 128, torch.bfloat16)
    x = torch.randn(m, 512, generator=gen).to(torch.bfloat16)
    expected = x.float() @ quant_matmul_ref(torch.eye(512), codes, scale.float())  # W.T in float32
    got = w4a16_matmul(x.cuda(), codes.cuda(), scale.cuda()).float().cpu()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)

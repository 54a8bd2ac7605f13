"""int4_tma_gemv (one row of int4 weights whose tiles fit one wave, codes brought by TMA, the MMA GEMV's PTX).
No CPU run: the PTX is int4_mma_gemv's, run on an emulated warp in test_kernel_int4_mma_gemv.py; here the
shape rule on CPU, the sm_90 build in test_kernel_sass.py, and on the card (`-m gpu`) the kernel against the
exact products and int4_linear's dispatch."""

from __future__ import annotations

import pytest
import torch

from framework.layers.quantization.int4 import dequantize_int4, quantize_int4
from kernels import int4_tma_gemv as tg
from kernels.quant_matmul import quant_matmul_ref

H200_SMS = 132


def test_shape_rule_takes_an_8b_models_qkv_and_o_only():
    """qkv (384 tiles) and o (256) fit a wave of three programs on 132 SMs; gate_up (1,792 tiles) and
    down (K = 14,336) stay on the MMA GEMV, where this kernel lost (BENCHMARKS.md, session 13)."""
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    assert {name: tg.shape_fits(n, k, 128, H200_SMS) for name, (n, k) in shapes.items()} == {
        "qkv": True, "o": True, "gate_up": False, "down": False}
    assert tg.shape_fits(16 * 3 * H200_SMS, 4096, 128, H200_SMS)  # exactly one wave
    assert not tg.shape_fits(16 * (3 * H200_SMS + 1), 4096, 128, H200_SMS)
    assert tg.shape_fits(3072, 2048, 128, H200_SMS)  # one chunk
    assert not tg.shape_fits(4096, 3072, 128, H200_SMS)  # K not in whole 2,048-column chunks
    assert not tg.shape_fits(4096, 4096, 64, H200_SMS)  # a slab must lie in one group
    assert not tg.shape_fits(4104, 4096, 128, H200_SMS)  # N in whole 16-row tiles


def test_not_taken_off_cuda_or_for_more_rows():
    codes, scale = quantize_int4(torch.randn(64, 2048) * 0.05, 128, torch.bfloat16)
    assert not tg.takes(torch.randn(1, 2048, dtype=torch.bfloat16), codes, scale)
    if torch.cuda.is_available():
        x2 = torch.randn(2, 2048, dtype=torch.bfloat16, device="cuda")
        assert not tg.takes(x2, codes.cuda(), scale.cuda())


def _exact(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double().cpu() @ dequantize_int4(codes.cpu(), scale.cpu(), torch.float64).T


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", [(6144, 4096, 128), (4096, 4096, 256), (48, 2048, 128), (1024, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_references(n, k, group, dtype):
    gen = torch.Generator().manual_seed(n + k + group)
    codes, scale = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group, dtype)
    codes, scale = codes.cuda(), scale.cuda()
    x = torch.randn(1, k, generator=gen).to(dtype).cuda()
    assert tg.takes(x, codes, scale)
    got = tg.int4_tma_gemv(x, codes, scale)
    assert got.dtype == dtype and got.shape == (1, n)
    torch.testing.assert_close(got.double().cpu(), _exact(x, codes, scale), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, quant_matmul_ref(x, codes, scale), atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_columns_land_where_they_belong():
    """x is a unit vector: the output is one column of the weight, rounded once to bf16 ((q - 8) x scale is
    exact in float32), so a lane, slab, chunk or row mix-up shows as inequality."""
    codes, scale = quantize_int4(torch.randn(64, 4096) * 0.05, 128, torch.bfloat16)
    weight = dequantize_int4(codes, scale, torch.float32).to(torch.bfloat16)
    for column in (0, 130, 2047, 2048, 4095):  # slabs, words, nibbles, both chunks
        x = torch.zeros(1, 4096, dtype=torch.bfloat16)
        x[0, column] = 1
        got = tg.int4_tma_gemv(x.cuda(), codes.cuda(), scale.cuda()).cpu()
        assert torch.equal(got[0], weight[:, column])


@pytest.mark.gpu
def test_gpu_int4_linear_takes_it_for_one_row_of_a_small_weight(monkeypatch):
    """One row of a weight that fits takes this kernel; two rows, or one row of a weight of more tiles
    than a wave, the MMA GEMV."""
    import kernels.int4_mma_gemv as mg
    from framework.layers.quantization import int4

    calls = []
    for module, name in ((tg, "int4_tma_gemv"), (mg, "int4_mma_gemv")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    small = [t.cuda() for t in quantize_int4(torch.randn(96, 2048) * 0.05, 128, torch.bfloat16)]
    tiles = 16 * (tg.PROGRAMS_AN_SM * torch.cuda.get_device_properties(0).multi_processor_count + 1)
    large = [t.cuda() for t in quantize_int4(torch.randn(tiles, 2048) * 0.05, 128, torch.bfloat16)]
    for rows, (codes, scale) in ((1, small), (2, small), (1, large)):
        x = torch.randn(rows, 2048, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(int4.int4_linear(x, codes, scale, None), quant_matmul_ref(x, codes, scale),
                                   atol=3e-2, rtol=2e-2)
    assert calls == ["int4_tma_gemv", "int4_mma_gemv", "int4_mma_gemv"]

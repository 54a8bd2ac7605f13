"""quant_matmul (fused dequantize + matmul) and dequantize_int4 against their references and
the quantization formats of framework/layers/quantization."""

from __future__ import annotations

import pytest
import torch

from framework.layers.quantization.fp8 import dequantize_fp8, quantize_fp8
from framework.layers.quantization.int4 import dequantize_int4 as format_dequantize_int4, quantize_int4
from framework.layers.quantization.int8 import dequantize_int8, quantize_int8
from kernels.quant_matmul import dequantize_int4, dequantize_ref, quant_matmul, quant_matmul_ref


def _weights(method: str, n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    if method == "int4":
        codes, scale = quantize_int4(w, group, dtype)
    else:
        codes, scale = (quantize_int8 if method == "int8" else quantize_fp8)(w)
    return codes, scale, gen


@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_reference_is_the_format(method):
    codes, scale, gen = _weights(method, 24, 64, 16, torch.float32)
    x = torch.randn(5, 64, generator=gen)
    weight = {"int4": lambda: format_dequantize_int4(codes, scale), "int8": lambda: dequantize_int8(codes, scale),
              "fp8": lambda: dequantize_fp8(codes, scale)}[method]()
    torch.testing.assert_close(quant_matmul_ref(x, codes, scale), x @ weight.T)


CASES = [(1, 40, 64, 16, None), (7, 96, 128, 32, None), (33, 72, 256, 128, None), (20, 16, 96, 48, None),
         (3, 64, 512, 64, 4)]  # the last splits K over 4 programs


@pytest.mark.parametrize("m,n,k,group,split", CASES)
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(method, m, n, k, group, split, dtype, device):
    codes, scale, gen = _weights(method, n, k, group, dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    expected = quant_matmul_ref(x, codes, scale)
    got = quant_matmul(x.to(device), codes.to(device), scale.to(device), split=split).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


# int4 for the rows int4_linear sends here (GEMV_MAX_ROWS < M <= SMALL_M), one row count a case
# (the interpreter is slow), cycling through dtypes and tiles. N = 100 is no multiple of 64 or
# 128. G = 32 / 128: tiles of one group (32 or 128 columns). G = 16 / 48: 32-column tiles across
# groups, and K = 80 / 144 ends half-way through the last tile.
INT4_CHUNKS = [(9, 16, 80), (16, 32, 96), (17, 128, 384), (31, 48, 144), (33, 16, 80), (40, 32, 192),
               (57, 48, 144), (64, 128, 256)]


def _nan_after(t: torch.Tensor, device: str, cols: int = 0) -> torch.Tensor:
    """t on `device`, followed in memory by NaN: `cols` NaN columns after each row and a NaN row
    after the last, so a load past K (or past the last row) poisons the result."""
    buf = torch.full((t.shape[0] + 1, t.shape[1] + cols), float("nan"), dtype=t.dtype)
    buf[:-1, :t.shape[1]] = t
    return buf.to(device)[:-1, :t.shape[1]]


@pytest.mark.parametrize("m,group,k", INT4_CHUNKS)
def test_int4_chunk_rows(m, group, k, device):
    dtype = (torch.float32, torch.float16)[m % 2]
    codes, scale, gen = _weights("int4", 100, k, group, dtype, seed=m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    expected = quant_matmul_ref(x, codes, scale)
    x_dev, codes_dev, scale_dev = _nan_after(x, device, cols=3), codes.to(device), _nan_after(scale, device)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for block_n in (None, 128):  # the default tile (64 weight rows up to 16 rows of x, then 128) and 128
        got = quant_matmul(x_dev, codes_dev, scale_dev, block_n=block_n).cpu()
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_column_order(dtype, device):
    """Row m of x is the unit vector of column picks[m], so row m of the output must be exactly that
    column of the weight: a swapped nibble, an even/odd mix-up or a scale from the wrong group
    shows as a wrong value, not a rounding difference."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly")
    codes, scale, _ = _weights("int4", 70, 256, 32, dtype)
    picks = [0, 1, 2, 3, 30, 31, 32, 33, 62, 63, 64, 65, 126, 127, 128, 129, 130, 191, 192, 254, 255]
    x = torch.zeros(len(picks), 256, dtype=dtype)
    x[torch.arange(len(picks)), picks] = 1
    got = quant_matmul(x.to(device), codes.to(device), scale.to(device)).cpu()
    assert torch.equal(got, dequantize_ref(codes, scale, dtype)[:, picks].T)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_gpu_bf16_llama_shape(method):
    codes, scale, gen = _weights(method, 1024, 4096, 128, torch.bfloat16)
    codes, scale = codes.cuda(), scale.cuda()
    for m in (1, 9, 16, 33, 64):
        x = torch.randn(m, 4096, generator=gen).to(torch.bfloat16).cuda()
        torch.testing.assert_close(quant_matmul(x, codes, scale), quant_matmul_ref(x, codes, scale),
                                   atol=2e-2, rtol=2e-2)
    if method == "int4":
        assert torch.equal(dequantize_int4(codes, scale, torch.bfloat16), dequantize_ref(codes, scale, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("group,k", [(16, 4112), (48, 4080)])  # K = 16 (mod 32): the last tile is half past K
def test_gpu_bf16_int4_small_groups(group, k):
    codes, scale, gen = _weights("int4", 1000, k, group, torch.bfloat16)
    codes, scale = codes.cuda(), scale.cuda()
    for m in (9, 40):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        torch.testing.assert_close(quant_matmul(x, codes, scale), quant_matmul_ref(x, codes, scale),
                                   atol=2e-2, rtol=2e-2)


# Tiles of 16 rows x 256 columns: fewer rows than a tile, a partial last row tile (N = 37), and
# K ending a half (384, 640) or most (144) of a column tile short.
@pytest.mark.parametrize("group,n,k", [(16, 12, 384), (48, 37, 144), (128, 40, 640)])
def test_dequantize_int4_is_exact(group, n, k, device):
    codes, scale, _ = _weights("int4", n, k, group, torch.float16)
    got = dequantize_int4(codes.to(device), scale.to(device), torch.float16).cpu()
    assert torch.equal(got, dequantize_ref(codes, scale, torch.float16))


def test_strided_activations(device):
    codes, scale, gen = _weights("int4", 32, 64, 32, torch.float32)
    wide = torch.randn(6, 100, generator=gen)
    x = wide[:, 10:74]  # rows with a stride: not contiguous
    got = quant_matmul(x.to(device), codes.to(device), scale.to(device)).cpu()
    torch.testing.assert_close(got, quant_matmul_ref(x.contiguous(), codes, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,rows", [("int4", 20), ("int4", 70), ("int8", 20), ("int8", 70)])
def test_quantized_layers_dispatch_to_the_kernels(force_triton, device, monkeypatch, method, rows):
    """A quantized linear takes the fused kernel for a chunk of rows (up to GEMV_MAX_ROWS: the
    GEMV, test_kernel_quant_gemv.py), dequantize + matmul for many."""
    import kernels.quant_matmul as module
    from framework.layers.linear import ColumnParallelLinear
    from framework.layers.quantization import get_quant_method
    from framework.config.schema import QuantizationConfig

    calls = []

    def spy(name):
        real = getattr(module, name)
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)
    for name in ("quant_matmul", "dequantize_int4"):
        monkeypatch.setattr(module, name, spy(name))
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48, bias=True, quant=get_quant_method(QuantizationConfig(method, 32), None))
    layer = layer.to(device)
    layer.weight.weight_loader(layer.weight, torch.randn(48, 64) * 0.05)
    layer.bias.weight_loader(layer.bias, torch.randn(48))
    x = torch.randn(rows, 64, device=device)
    expected = quant_matmul_ref(x.cpu(), layer.weight.cpu(), layer.weight_scale.cpu()) + layer.bias.cpu()
    torch.testing.assert_close(layer(x).cpu(), expected, atol=1e-5, rtol=1e-5)
    few = rows <= module.SMALL_M
    assert calls == (["quant_matmul"] if few else ["dequantize_int4"] if method == "int4" else [])

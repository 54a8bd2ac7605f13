"""int4_gemv and rowscaled_gemv (the quantized decode GEMVs) against quant_matmul_ref (dequantize,
then one matmul) and against float64 of the exact weights; and the quantized layers' dispatch."""

from __future__ import annotations

import pytest
import torch

from framework.layers.quantization.fp8 import quantize_fp8
from framework.layers.quantization.int4 import dequantize_int4, quantize_int4
from framework.layers.quantization.int8 import quantize_int8
from kernels.quant_gemv import DISPATCH_MAX_ROWS, GEMV_MAX_ROWS, int4_gemv, rowscaled_gemv
from kernels.quant_matmul import dequantize_ref, quant_matmul_ref

N = 37  # not a multiple of any block_n


def _weights(method: str, n: int, k: int, group: int, dtype: torch.dtype, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen) * 0.05
    if method == "int4":
        return quantize_int4(w, group, dtype)
    return (quantize_int8 if method == "int8" else quantize_fp8)(w)


def _x(rows: int, k: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Random rows with a stride, whose storage continues with NaN: 3 NaN columns after each row
    and a NaN row after the last, so a load past K (or past the last row) poisons the result."""
    buf = torch.full((rows + 1, k + 3), float("nan"))
    buf[:rows, :k] = torch.randn(rows, k, generator=gen)
    return buf.to(dtype=dtype, device=device)[:rows, :k]


def _exact(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 of x times the weight the codes stand for (no rounding of the weight)."""
    if codes.dtype == torch.uint8:
        return x.double().cpu() @ dequantize_int4(codes.cpu(), scale.cpu(), torch.float64).T
    return (x.double().cpu() @ codes.cpu().double().T) * scale.cpu().double()


def _check(got: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    assert got.dtype == x.dtype and got.shape == (x.shape[0], codes.shape[0])
    tol = 1e-5 if x.dtype == torch.float32 else 2e-3
    # float32 accumulation, then one rounding to the output dtype
    torch.testing.assert_close(got.double().cpu(), _exact(x, codes, scale), atol=tol, rtol=tol)
    # the engine's CPU path; it rounds the weight to x's dtype, hence the looser bound for fp16
    expected = quant_matmul_ref(x.cpu().contiguous(), codes.cpu(), scale.cpu())
    torch.testing.assert_close(got.cpu(), expected, atol=2 * tol, rtol=2 * tol)


# Each row count once (the interpreter is slow), cycling through the dtypes and group sizes:
# 16 / 32 / 128 and two that are not powers of two (48, and per-channel 384), spans of 16, 32,
# 128, 16 and 128 columns. K = 384 in tiles of 256: a whole tile, then one half past K.
# One program of 64 columns for N = 37 (several programs: test_default_blocks).
@pytest.mark.parametrize("rows", range(1, GEMV_MAX_ROWS + 1))
def test_int4_matches_references(rows, device):
    gen = torch.Generator().manual_seed(rows)
    dtype = (torch.float32, torch.float16)[rows % 2]
    group = (16, 32, 128, 48, 384)[rows % 5]
    codes, scale = _weights("int4", N, 384, group, dtype, gen)
    x = _x(rows, 384, dtype, device, gen)
    _check(int4_gemv(x, codes.to(device), scale.to(device), block_n=64, block_k=256), x, codes, scale)


@pytest.mark.parametrize("rows", range(1, GEMV_MAX_ROWS + 1))
def test_rowscaled_matches_references(rows, device):
    gen = torch.Generator().manual_seed(rows)
    method = ("int8", "fp8")[rows % 2]
    dtype = (torch.float32, torch.float16)[rows // 2 % 2]
    codes, scale = _weights(method, N, 100, 0, dtype, gen)
    x = _x(rows, 100, dtype, device, gen)  # block_k 64 over K = 100: a whole tile and 36 columns
    _check(rowscaled_gemv(x, codes.to(device), scale.to(device), block_n=64, block_k=64), x, codes, scale)


def test_fp8_nan_bytes_past_the_weight_stay_out(device):
    # The codes are followed by NaN bytes, which a load past K on the last row meets: the kernel
    # must mask or zero them (x = 0 there is not enough: NaN * 0 is NaN). Only CUDA can catch a
    # slip: Triton's CPU interpreter decodes e4m3fn NaN (0x7F) as 480.
    gen = torch.Generator().manual_seed(0)
    codes, scale = _weights("fp8", 5, 40, 0, torch.float32, gen)
    buf = torch.full((6, 40), float("nan")).to(torch.float8_e4m3fn)
    buf[:5] = codes
    x = _x(2, 40, torch.float32, device, gen)
    _check(rowscaled_gemv(x, buf.to(device)[:5], scale.to(device), block_n=4, block_k=64), x, codes, scale)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_default_blocks(method, device):
    # K = 1536: int4 one default tile of 2,048 columns, a quarter past K; int8 a tile of 1,024 and a
    # half-used one. N = 9 spans several programs.
    gen = torch.Generator().manual_seed(1)
    codes, scale = _weights(method, 9, 1536, 128, torch.float32, gen)
    x = _x(2, 1536, torch.float32, device, gen)
    fn = int4_gemv if method == "int4" else rowscaled_gemv
    got = fn(x, codes.to(device), scale.to(device))
    torch.testing.assert_close(got.double().cpu(), _exact(x, codes, scale), atol=1e-4, rtol=1e-5)


def test_rows_are_not_mixed(device):
    # Row m of x is the m-th unit vector: row m of the output must be column m of the weight.
    gen = torch.Generator().manual_seed(2)
    codes, scale = _weights("int4", 6, 32, 16, torch.float32, gen)
    x = torch.eye(GEMV_MAX_ROWS, 32, device=device)
    got = int4_gemv(x, codes.to(device), scale.to(device), block_n=4, block_k=32).cpu()
    assert torch.equal(got, dequantize_ref(codes, scale, torch.float32)[:, :GEMV_MAX_ROWS].T)


def test_no_rows(device):
    codes, scale = _weights("int4", 6, 32, 16, torch.float32, torch.Generator().manual_seed(0))
    assert int4_gemv(torch.empty(0, 32, device=device), codes.to(device), scale.to(device)).shape == (0, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_gpu_bf16_llama_shape(method):
    gen = torch.Generator().manual_seed(0)
    codes, scale = _weights(method, 1024, 4096, 128, torch.bfloat16, gen)
    fn = int4_gemv if method == "int4" else rowscaled_gemv
    for rows in (1, 3, GEMV_MAX_ROWS):
        x = torch.randn(rows, 4096, generator=gen).to(torch.bfloat16).cuda()
        got = fn(x, codes.cuda(), scale.cuda())
        torch.testing.assert_close(got.double().cpu(), _exact(x, codes, scale), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got, quant_matmul_ref(x, codes.cuda(), scale.cuda()), atol=3e-2, rtol=2e-2)


# --- dispatch from the quantized linear layers ----------------------------------------------
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("shape", [(1, 64), (2, 2, 64), (GEMV_MAX_ROWS + 1, 64)])
def test_layers_dispatch(force_triton, device, monkeypatch, method, shape):
    """Decode rows take the GEMV, more rows the fused matmul (beyond SMALL_M: the dequantize path,
    test_kernel_quant_matmul.py)."""
    import kernels.quant_gemv as gemv_module
    import kernels.quant_matmul as matmul_module
    from framework.config.schema import QuantizationConfig
    from framework.layers.linear import ColumnParallelLinear
    from framework.layers.quantization import get_quant_method

    calls = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    for name in ("int4_gemv", "rowscaled_gemv"):
        spy(gemv_module, name)
    for name in ("quant_matmul", "dequantize_int4"):
        spy(matmul_module, name)
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48, bias=True, quant=get_quant_method(QuantizationConfig(method, 32), None))
    layer = layer.to(device)
    layer.weight.weight_loader(layer.weight, torch.randn(48, 64) * 0.05)
    layer.bias.weight_loader(layer.bias, torch.randn(48))
    x = torch.randn(shape, device=device)
    rows = x.numel() // 64
    expected = quant_matmul_ref(x.cpu().view(rows, 64), layer.weight.cpu(), layer.weight_scale.cpu()) + layer.bias.cpu()
    torch.testing.assert_close(layer(x).cpu().view(rows, 48), expected, atol=1e-5, rtol=1e-5)
    gemv = "int4_gemv" if method == "int4" else "rowscaled_gemv"
    assert calls == [gemv if rows <= DISPATCH_MAX_ROWS else "quant_matmul"]

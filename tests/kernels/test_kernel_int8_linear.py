"""W8A8 int8 (kernels/int8_linear.py): the per-token quantizer and the epilogue against their torch
references (CPU: Triton's interpreter; fp32/fp16), the Triton int8 GEMM's sums and scales against float64,
the whole product against float64, and the int8 layer's choice between W8A8 and weight-only.
torch._int_mm (the bench's alternative) is checked on the GPU."""

from __future__ import annotations

import pytest
import torch

from framework.layers.quantization.int8 import WEIGHT_ONLY_MAX_ROWS, Int8Method, quantize_int8, scaled_linear
from kernels.int8_linear import (MIN_SCALE, gemm_tile, int8_gemm, int8_linear, int8_linear_ref, quantize_rows_int8,
                                 quantize_rows_int8_ref, scale_output)


def _x(rows: int, k: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Random rows of varied magnitude, a row stride past K (NaN there: a load past K poisons the
    result), row 1 all zeros (as CUDA-graph padding rows are), and exact .5 steps in row 0."""
    buf = torch.full((rows, k + 8), float("nan"))
    buf[:, :k] = torch.randn(rows, k, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    if rows > 1:
        buf[1, :k] = 0
    buf[0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # absmax 127: scale 1, ties to even
    return buf.to(dtype=dtype, device=device)[:, :k]


def test_reference_quantization_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = _x(6, 200, torch.float32, "cpu", gen)
    codes, scale = quantize_rows_int8_ref(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.shape == (6,)
    assert scale[1].item() == pytest.approx(MIN_SCALE) and (codes[1] == 0).all()
    assert codes[0, :4].tolist() == [127, 0, 2, -2]
    assert ((codes.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,block_k", [(200, 256), (200, 64)])  # one tile; four, the last part-used
def test_quantizer_matches_reference(dtype, k, block_k, device):
    gen = torch.Generator().manual_seed(k + block_k)
    x = _x(5, k, dtype, device, gen)
    codes, scale = quantize_rows_int8(x, block_k=block_k)
    ref_codes, ref_scale = quantize_rows_int8_ref(x.cpu())
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=0, atol=0)
    assert torch.equal(codes.cpu(), ref_codes)


@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_matches_torch(bias, device):
    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-2**20, 2**20, (37, 150), generator=gen, dtype=torch.int32)
    xs, ws = torch.rand(37, generator=gen), torch.rand(150, generator=gen)
    b = torch.randn(150, generator=gen) if bias else None
    got = scale_output(acc.to(device), xs.to(device), ws.to(device), None if b is None else b.to(device),
                       torch.float32).cpu()
    expected = acc.float() * xs[:, None] * ws[None, :] + (b if bias else 0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k", [(37, 40, 100), (16, 32, 64)])  # ragged in every dim; whole tiles
def test_int8_gemm_sums_exactly_and_scales(m, n, k, bias, device):
    gen = torch.Generator().manual_seed(m + n + k)
    xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    xs, ws = torch.rand(m, generator=gen), torch.rand(n, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    got = int8_gemm(xq.to(device), xs.to(device), codes.to(device), ws.to(device),
                    None if b is None else b.to(device), torch.float32, tile=(16, 16, 4, 2), block_k=32).cpu()
    sums = (xq.double() @ codes.double().T)  # exact: |sum| < 2^21
    expected = (sums * xs.double()[:, None] * ws.double()[None, :] + (b.double() if bias else 0)).float()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_int8_gemm_tiles_fill_the_card():
    cpu = torch.device("cpu")  # 132 SMs assumed off the GPU
    assert gemm_tile(2048, 4096, cpu) == (128, 128, 8, 3)  # 16 x 32 tiles
    assert gemm_tile(256, 4096, cpu) == (128, 64, 4, 4)  # 2 x 32 tiles of 128 would leave SMs idle
    assert gemm_tile(48, 28672, cpu) == (64, 128, 4, 4)


def test_reference_product_is_the_dequantized_product():
    gen = torch.Generator().manual_seed(1)
    x = _x(5, 64, torch.float32, "cpu", gen)
    codes, scale = quantize_int8(torch.randn(48, 64, generator=gen) * 0.05)
    bias = torch.randn(48, generator=gen)
    xq, xs = quantize_rows_int8_ref(x)
    exact = (xq.double() * xs.double()[:, None]) @ (codes.double() * scale.double()[:, None]).T + bias.double()
    torch.testing.assert_close(int8_linear_ref(x, codes, scale, bias).double(), exact, rtol=1e-5, atol=1e-6)
    full = x.double() @ (codes.double() * scale.double()[:, None]).T + bias.double()
    assert ((exact - full).norm() / full.norm()).item() < 0.02  # x rounded to 8 bits


def test_layer_stays_weight_only_on_cpu():
    gen = torch.Generator().manual_seed(2)
    codes, scale = quantize_int8(torch.randn(16, 32, generator=gen))
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale = codes, scale
    x = torch.randn(WEIGHT_ONLY_MAX_ROWS + 8, 32, generator=gen)
    torch.testing.assert_close(Int8Method().apply(layer, x, None), scaled_linear(x, codes, scale, None))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [128, 4096])
def test_gpu_int8_linear(k):
    gen = torch.Generator().manual_seed(k)
    codes, scale = (t.cuda() for t in quantize_int8(torch.randn(256, k, generator=gen) * 0.05))
    bias = torch.randn(256, generator=gen).to(torch.bfloat16).cuda()
    for rows in (17, 64, 300):
        x = _x(rows, k, torch.bfloat16, "cuda", gen)
        got = int8_linear(x, codes, scale, bias)
        ref = int8_linear_ref(x, codes, scale, bias)
        assert got.dtype == torch.bfloat16
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 4e-3
        # the same int32 sums and the same epilogue arithmetic as cuBLASLt's GEMM + the epilogue pass
        assert torch.equal(got, int8_linear(x, codes, scale, bias, gemm="cublas"))


@pytest.mark.gpu
def test_gpu_layer_runs_w8a8_above_the_weight_only_rows_and_in_a_graph():
    gen = torch.Generator().manual_seed(3)
    codes, scale = (t.cuda() for t in quantize_int8(torch.randn(256, 128, generator=gen) * 0.05))
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale = codes, scale
    few = _x(WEIGHT_ONLY_MAX_ROWS, 128, torch.bfloat16, "cuda", gen)
    torch.testing.assert_close(Int8Method().apply(layer, few, None), scaled_linear(few, codes, scale, None))
    rows = WEIGHT_ONLY_MAX_ROWS + 8
    x = _x(rows, 128, torch.bfloat16, "cuda", gen)
    torch.testing.assert_close(Int8Method().apply(layer, x, None), int8_linear(x, codes, scale), rtol=0, atol=0)
    torch.testing.assert_close(Int8Method(quantize_activations=False).apply(layer, x, None),
                               scaled_linear(x, codes, scale, None))
    static_x = x.clone()
    Int8Method().apply(layer, static_x, None)  # warm: compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = Int8Method().apply(layer, static_x, None)
    fresh = _x(rows, 128, torch.bfloat16, "cuda", gen)
    static_x.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(static_y, int8_linear(fresh, codes, scale), rtol=0, atol=0)

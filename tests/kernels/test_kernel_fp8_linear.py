"""W8A8 fp8 (kernels/fp8_linear.py): the per-token quantization and the whole product against
their torch references and float64, and the fp8 layer's choice between W8A8 and weight-only.

Triton's CPU interpreter rounds float32 -> e4m3 wrongly near powers of two, and torch._scaled_mm
needs fp8 tensor cores: the kernel tests are `gpu`; the references are checked on the CPU."""

from __future__ import annotations

import pytest
import torch

import kernels
from framework.layers.quantization.fp8 import WEIGHT_ONLY_MAX_ROWS, Fp8Method, quantize_fp8
from framework.layers.quantization.int8 import scaled_linear
from kernels.fp8_linear import (FAST_ACCUM_MAX_K, FP8, FP8_MAX, MIN_SCALE, fp8_linear, fp8_linear_ref,
                                native_fp8, quantize_rows, quantize_rows_ref)


def _x(rows: int, k: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Random rows of varied magnitude with a row stride past K (NaN there: a load past K poisons
    the result); row 1 (if any) is all zeros, as CUDA-graph padding rows are."""
    buf = torch.full((rows, k + 8), float("nan"))
    buf[:, :k] = torch.randn(rows, k, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    if rows > 1:
        buf[1, :k] = 0
    return buf.to(dtype=dtype, device=device)[:, :k]


def _weight(n: int, k: int, gen: torch.Generator):
    return quantize_fp8(torch.randn(n, k, generator=gen) * 0.05)


# --- the references (CPU) -------------------------------------------------------------------
def test_reference_quantization_within_three_mantissa_bits():
    gen = torch.Generator().manual_seed(0)
    x = _x(6, 200, torch.float32, "cpu", gen)
    codes, scale = quantize_rows_ref(x)
    assert codes.dtype == FP8 and codes.shape == x.shape and scale.shape == (6, 1)
    deq = codes.float() * scale
    assert not torch.isnan(deq).any()
    assert scale[1].item() == pytest.approx(MIN_SCALE) and (deq[1] == 0).all()  # the zero row
    # each row's absmax lands on +-448 exactly; every element within half a step of 3 mantissa
    # bits (2^-4 relative), or of the subnormal step (2^-9 of the scale) near zero
    nonzero = [r for r in range(6) if r != 1]
    assert (codes[nonzero].float().abs().amax(dim=1) == FP8_MAX).all()
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)
    assert ((deq - x).abs() <= bound + 1e-12).all()


def test_reference_product_is_the_dequantized_product():
    gen = torch.Generator().manual_seed(1)
    x = _x(5, 64, torch.float32, "cpu", gen)
    codes, scale = _weight(48, 64, gen)
    bias = torch.randn(48, generator=gen)
    xq, xs = quantize_rows_ref(x)
    exact = (xq.double() * xs.double()) @ (codes.double() * scale.double()[:, None]).T + bias.double()
    torch.testing.assert_close(fp8_linear_ref(x, codes, scale, bias).double(), exact, rtol=1e-5, atol=1e-6)
    # and W8A8 stays close to the unquantized product (x rounded to 3 mantissa bits)
    full = x.double() @ (codes.double() * scale.double()[:, None]).T + bias.double()
    assert ((fp8_linear_ref(x, codes, scale, bias).double() - full).norm() / full.norm()).item() < 0.05


def test_cpu_stays_weight_only():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=gen, dtype=torch.bfloat16)
    codes, scale = _weight(32, 64, gen)
    assert not native_fp8(x) and not kernels.fp8_linear_supported(x, codes)
    layer = _layer(codes, scale)
    torch.testing.assert_close(Fp8Method().apply(layer, x, None), scaled_linear(x, codes, scale, None))


def _layer(codes: torch.Tensor, scale: torch.Tensor) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale = codes, scale
    return layer


# --- the kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("k,block_k", [(96, 4096), (300, 64)])  # one tile; five, the last partial
def test_quantize_rows_scales_in_the_interpreter(k, block_k, device):
    """The row scales (no fp8 rounding involved) match exactly wherever the kernel runs; the
    codes are checked on the GPU below (the interpreter's e4m3 rounding is off)."""
    gen = torch.Generator().manual_seed(k)
    x = _x(5, k, torch.float32, device, gen)
    _, scale = quantize_rows(x, block_k=block_k)
    assert torch.equal(scale.cpu(), quantize_rows_ref(x.cpu())[1])


# K: one tile, several tiles with a partial last one (14336 = 3.5 x 4096), and a small odd-sized one
@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,dtype", [(1, 4096, torch.bfloat16), (7, 14336, torch.bfloat16),
                                          (33, 96, torch.float16), (5, 4096 + 16, torch.float32)])
def test_quantize_rows_matches_reference_exactly(rows, k, dtype):
    gen = torch.Generator().manual_seed(rows)
    x = _x(rows, k, dtype, "cuda", gen)
    codes, scale = quantize_rows(x)
    ref_codes, ref_scale = quantize_rows_ref(x)
    torch.testing.assert_close(scale, ref_scale, rtol=2.4e-7, atol=0)  # an ulp at most
    # the same codes, but for the rare value on a rounding boundary that a one-ulp scale moves
    # to its neighbour (one e4m3 step: 2^-3 of the value at most)
    differ = codes.view(torch.uint8) != ref_codes.view(torch.uint8)
    assert differ.float().mean().item() < 1e-3
    deq, ref_deq = codes[differ].float(), ref_codes[differ].float()
    assert ((deq - ref_deq).abs() <= ref_deq.abs() * 2.0**-3 + 2.0**-9).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fast_accum", [False, True, None])  # None: the default, fast up to FAST_ACCUM_MAX_K
@pytest.mark.parametrize("rows,k", [(1, 512), (2, 512), (17, 512), (300, 512), (64, 4096), (64, 14336)])
def test_fp8_linear_matches_reference(rows, k, fast_accum):
    assert native_fp8(torch.empty(1, device="cuda")), "these tests need an fp8 card (compute capability >= 8.9)"
    if fast_accum and k > FAST_ACCUM_MAX_K:
        pytest.skip("never dispatched; cuBLASLt had no fast kernel for it (CUBLAS_STATUS_NOT_SUPPORTED, H200)")
    gen = torch.Generator().manual_seed(rows)
    x = _x(rows, k, torch.bfloat16, "cuda", gen)
    codes, scale = (t.cuda() for t in _weight(272, k, gen))
    bias = torch.randn(272, generator=gen).to(torch.bfloat16).cuda()
    got = fp8_linear(x, codes, scale, bias, fast_accum=fast_accum)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 272)
    ref = fp8_linear_ref(x, codes, scale, bias).float()
    # the same fp8 operands; float32 (or fast) accumulation, one rounding to bf16
    err = ((got.float() - ref).norm() / ref.norm()).item()
    fast = fast_accum if fast_accum is not None else k <= FAST_ACCUM_MAX_K
    assert err < (1e-2 if fast else 5e-3), err


@pytest.mark.gpu
def test_layer_runs_w8a8_above_the_weight_only_rows_and_in_a_graph():
    gen = torch.Generator().manual_seed(3)
    codes, scale = (t.cuda() for t in _weight(256, 128, gen))
    layer = _layer(codes, scale)
    for few in (1, WEIGHT_ONLY_MAX_ROWS):  # the GEMV (at its fp8 tile), then quant_matmul
        x = _x(few, 128, torch.bfloat16, "cuda", gen)
        torch.testing.assert_close(Fp8Method().apply(layer, x, None), scaled_linear(x, codes, scale, None))
    rows = WEIGHT_ONLY_MAX_ROWS + 8
    x = _x(rows, 128, torch.bfloat16, "cuda", gen).reshape(2, rows // 2, 128)
    got = Fp8Method().apply(layer, x, None)
    assert got.shape == (2, rows // 2, 256)
    torch.testing.assert_close(got.view(rows, 256), fp8_linear(x.reshape(rows, 128), codes, scale), rtol=0, atol=0)
    weight_only = Fp8Method(quantize_activations=False).apply(layer, x, None)
    torch.testing.assert_close(weight_only, scaled_linear(x, codes, scale, None))
    # captured in a CUDA graph (as decode steps are), replayed on new inputs
    static_x = x.reshape(rows, 128).clone()
    Fp8Method().apply(layer, static_x, None)  # warm: compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = Fp8Method().apply(layer, static_x, None)
    fresh = _x(rows, 128, torch.bfloat16, "cuda", gen)
    static_x.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(static_y, fp8_linear(fresh, codes, scale), rtol=0, atol=0)

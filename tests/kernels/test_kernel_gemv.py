"""linear_gemv (the decode GEMV), its reference, and the `kernels.linear` dispatch."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.gemv import GEMV_MAX_ROWS, MAX_ROWS, linear_gemv, linear_ref

GEMV_MODULE = sys.modules["kernels.gemv"]


def _poisoned(rows: int, cols: int, dtype: torch.dtype, device: str, gen: torch.Generator,
              pad: int = 0) -> torch.Tensor:
    """Random [rows, cols] whose storage continues with NaN: `pad` NaN columns after each row
    (a strided view) and NaN rows after the last one, so a load past a mask poisons the result."""
    buf = torch.full((rows + 2, cols + pad), float("nan"))
    buf[:rows, :cols] = torch.randn(rows, cols, generator=gen)
    buf = buf.to(dtype=dtype, device=device)
    return buf[:rows, :cols] if pad else buf.view(-1)[: rows * cols].view(rows, cols)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = _poisoned(m, k, dtype, device, gen, pad=3)  # strided rows
    weight = _poisoned(n, k, dtype, device, gen)  # contiguous, as the dispatch requires
    bias = torch.randn(n, generator=gen).to(dtype=dtype, device=device)
    return x, weight, bias


def _exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def test_reference_is_f_linear():
    x, weight, bias = _inputs(3, 10, 16, torch.float32, "cpu")
    assert torch.equal(linear_ref(x, weight, bias), F.linear(x, weight, bias))


# N, K not multiples of the blocks; block_k=32 over K=100 is 3 full tiles and a partial one.
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(rows, dtype, device):
    x, weight, bias = _inputs(rows, 37, 100, dtype, device, seed=rows)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for b in (bias, None):
        got = linear_gemv(x, weight, b, block_n=8, block_k=32)
        assert got.dtype == dtype and got.shape == (rows, 37)
        # Against float64 of the same inputs: one rounding of an fp32 sum to the output dtype.
        torch.testing.assert_close(got.double().cpu(), _exact(x, weight, b).cpu(), atol=tol, rtol=tol)


def test_default_blocks_with_k_not_a_power_of_two(device):
    x, weight, bias = _inputs(2, 9, 1500, torch.float32, device)  # two K tiles, the second partial
    torch.testing.assert_close(linear_gemv(x, weight, bias).double().cpu(), _exact(x, weight, bias).cpu(),
                               atol=1e-4, rtol=1e-5)


def test_rows_are_not_mixed(device):
    # Row m of x is m-th unit vector: row m of the output must be column m of the weight (+ bias).
    _, weight, bias = _inputs(1, 5, 8, torch.float32, device)
    x = torch.eye(MAX_ROWS, 8, device=device)
    assert torch.equal(linear_gemv(x, weight, bias, block_k=4), weight.T + bias)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the kernels.gemv implementations called, in order (they still run)."""
    seen: list[str] = []

    def spy(name):
        real = getattr(GEMV_MODULE, name)
        return lambda *args, **kwargs: seen.append(name) or real(*args, **kwargs)
    for name in ("linear_gemv", "linear_ref"):
        monkeypatch.setattr(GEMV_MODULE, name, spy(name))
    return seen


@pytest.mark.parametrize("shape", [(GEMV_MAX_ROWS, 24), (1, GEMV_MAX_ROWS, 24), (24,)])
def test_dispatch_takes_the_gemv_for_few_rows(force_triton, calls, device, shape):
    x = torch.randn(shape, device=device)
    weight, bias = torch.randn(10, 24, device=device), torch.randn(10, device=device)
    y = kernels.linear(x, weight, bias)
    assert calls == ["linear_gemv"]
    assert y.shape == (*shape[:-1], 10)
    torch.testing.assert_close(y, F.linear(x, weight, bias))


FALLBACKS = {  # (x, weight) the GEMV does not take
    "too many rows": lambda d: (torch.randn(GEMV_MAX_ROWS + 1, 24, device=d), torch.randn(10, 24, device=d)),
    "too many rows 3-D": lambda d: (torch.randn(3, 3, 24, device=d), torch.randn(10, 24, device=d)),
    "no rows": lambda d: (torch.randn(0, 24, device=d), torch.randn(10, 24, device=d)),
    "strided weight": lambda d: (torch.randn(1, 24, device=d), torch.randn(24, 10, device=d).T),
    "float64": lambda d: (torch.randn(1, 24, device=d).double(), torch.randn(10, 24, device=d).double()),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_dispatch_falls_back_to_f_linear(force_triton, calls, device, case):
    x, weight = FALLBACKS[case](device)
    torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight))
    assert calls == ["linear_ref"]


def test_mixed_dtypes_get_f_linear_error(force_triton, calls, device):
    # Not a silent mixed-dtype GEMV: the call behaves exactly as F.linear, which refuses it.
    with pytest.raises(RuntimeError):
        kernels.linear(torch.randn(2, 24, device=device), torch.randn(10, 24, device=device).half())
    assert calls == ["linear_ref"]


def test_cpu_without_force_runs_reference(calls, monkeypatch):
    monkeypatch.delenv("KERNELS_FORCE_TRITON", raising=False)
    kernels.linear(torch.randn(1, 8), torch.randn(4, 8))
    assert calls == ["linear_ref"]


def test_linear_layer_uses_the_dispatch(force_triton, calls, device):
    from framework.layers.linear import ReplicatedLinear

    layer = ReplicatedLinear(24, 10, bias=True).to(device)
    layer.weight.weight_loader(layer.weight, torch.randn(10, 24))
    layer.bias.weight_loader(layer.bias, torch.randn(10))
    x = torch.randn(GEMV_MAX_ROWS, 24, device=device)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == ["linear_gemv"]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
def test_gpu_bf16_llama_shape(rows):
    x, weight, bias = _inputs(rows, 6144, 4096, torch.bfloat16, "cuda")
    torch.testing.assert_close(linear_gemv(x, weight, bias), linear_ref(x, weight, bias), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(linear_gemv(x, weight, bias).double(), _exact(x, weight, bias), atol=5e-2, rtol=1e-2)

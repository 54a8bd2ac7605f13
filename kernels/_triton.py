"""Triton plumbing shared by the kernels: the optional import, programmatic dependent launch
(`pdl_enter`, `pdl`), the zeroed ticket counters of kernels whose last program finishes a
group's work (`zeroed_tickets`), and the matmuls' grouped tile order (`grouped_tile`).

Optional import, so the torch references run on machines without Triton. The CPU backend only
ever calls the `*_ref` functions, but they live beside their Triton kernels; importing a kernel
file must therefore not require Triton. When it is missing,
`triton` and `tl` below are stand-ins that let `@triton.jit` functions be *defined* (never
launched): the decorator returns the function unchanged and `tl.constexpr` annotations resolve.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on Triton-less installs
    HAS_TRITON = False

    class _Missing:
        """Absorbs attribute access and decoration; any real use fails at launch time."""

        def __getattr__(self, name: str) -> Any:
            return _Missing()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # bare @decorator
            return self  # decorator factory, e.g. @triton.jit(...)

    triton = _Missing()  # type: ignore[assignment]
    tl = _Missing()  # type: ignore[assignment]


try:  # grid dependency control (Hopper and later); absent from older Tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.backends.nvidia.compiler import CUDAOptions

    HAS_PDL = HAS_TRITON and "launch_pdl" in CUDAOptions.__dataclass_fields__
except Exception:  # pragma: no cover - Tritons without it
    HAS_PDL = False


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of every kernel a decode step launches. Launched with programmatic
    dependent launch (`pdl(device)`), a kernel's programs may be scheduled while the kernel before
    it in the stream is still finishing; this waits until that kernel is done (its writes visible)
    before anything is read or written, then lets the next kernel be scheduled the same way. What
    it saves is the launch latency and the previous kernel's tail at every kernel boundary: a
    batch-1 decode step is ~330 kernels of 2-60 us. (GEMVs that loaded their first weight tile
    before the wait lost 4% at batch 1 on an H200: their loads queued ahead of the one-program
    norm or rotary kernel they waited for; BENCHMARKS.md, session 7.)"""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in a matmul's 1-D grid, in groups of GROUP_M row
    tiles down each column tile: a group reads its weight tiles while they are still in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


_PDL_WANTED = True  # compilation.programmatic_dependent_launch, set by the model runner


def set_pdl(enabled: bool) -> None:
    """Whether kernels launched from now on use programmatic dependent launch where it exists."""
    global _PDL_WANTED
    _PDL_WANTED = bool(enabled)


@functools.cache
def pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch: Hopper (compute capability 9.0) and later, compiled kernels
    (not the interpreter), a Triton that has it."""
    return (HAS_PDL and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


_PDL_ON: Dict[str, Any] = {"PDL": True, "launch_pdl": True}
_PDL_OFF: Dict[str, Any] = {"PDL": False}


def pdl(device: torch.device) -> Dict[str, Any]:
    """Launch keywords for a kernel that starts with `pdl_enter(PDL)`: programmatic dependent
    launch on Hopper and later GPUs (CUDA graphs keep it as programmatic edges); PDL=False
    elsewhere, and inside torch.compile, whose wrapper of Triton launches takes no launch_pdl.
    Called at every launch, so it stays cheap (an eager batch-1 step launches ~330 kernels)."""
    if not _PDL_WANTED or device.type != "cuda" or not pdl_supported(device.index or 0):
        return _PDL_OFF
    return _PDL_OFF if torch.compiler.is_compiling() else _PDL_ON


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device, off_gpu: int) -> int:
    """Streaming multiprocessors of a CUDA device, for grid sizing; `off_gpu` elsewhere (the
    interpreter's tests pick the stand-in their expectations were written for)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else off_gpu


_TICKETS: Dict[torch.device, torch.Tensor] = {}
_OUTGROWN_TICKETS: List[torch.Tensor] = []


def zeroed_tickets(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` int32 counters, zero, kept for the process (one buffer a device). A kernel
    whose programs take tickets (`tl.atomic_add`) so that the last one of a group finishes the
    group's work resets its counter to zero; the buffer is zero again after every call, so calls
    in CUDA graphs can use it (the warm-up before a capture allocates it). Kernels on one stream
    never run at once (programmatic dependent launch waits for the previous kernel first), so
    they share it."""
    have = _TICKETS.get(device)
    if have is None or have.numel() < count:
        if have is not None:  # graphs captured with the smaller buffer still point at it
            _OUTGROWN_TICKETS.append(have)
        have = _TICKETS[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return have


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


__all__ = ["HAS_PDL", "HAS_TRITON", "grouped_tile", "next_pow2", "num_sms", "pdl", "pdl_enter", "pdl_supported", "set_pdl",
           "tl", "triton", "zeroed_tickets"]

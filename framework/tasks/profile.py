"""bench's `task.profile=true`: one run under torch.profiler (device activity only, so the host
loop runs at its usual speed), its kernels' device time grouped by what they do.

Kernels inside CUDA graph replays are recorded too (CUPTI reports each). One stream runs every
kernel, so device idle time is the run's wall time less the kernels' sum: host gaps, launch
latency and synchronisation. With programmatic dependent launch (compilation.
programmatic_dependent_launch, on by default on Hopper) a kernel's time includes its wait for the
one before, so per-kind times are inflated and the sum can pass the wall time: profile with it
off to see each kind's own time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Tuple

# First match wins, in this order; names are matched lower-cased, as substrings.
KINDS: List[Tuple[str, Tuple[str, ...]]] = [
    ("decode attention", ("_decode_split_kernel",)),
    ("prefill/mixed attention", ("_paged_attention_kernel",)),
    ("rotary + KV store", ("rotary", "store_kv")),
    ("norms", ("rms_norm",)),
    ("silu * mul", ("silu",)),
    ("GEMV (1 row)", ("gemv",)),
    ("GEMM", ("gemm", "matmul", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "splitk")),
    ("argmax / sampling", ("argmax", "argmin", "reduce_kernel", "softmax", "topk", "sort")),
    ("copies, gathers, casts", ("copy", "memcpy", "memset", "index", "gather", "scatter", "where",
                                "elementwise", "fill", "cat")),
]


def kind_of_kernel(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def group_kernels(times: Dict[str, float]) -> Dict[str, float]:
    """Kernel name -> device seconds, summed into KINDS."""
    out: Dict[str, float] = {}
    for name, seconds in times.items():
        kind = kind_of_kernel(name)
        out[kind] = out.get(kind, 0.0) + seconds
    return out


def profile_run(run: Callable[[], float], out_dir: Path, file_name: str = "profile.txt") -> Dict[str, object]:
    """Profile `run` (returns its wall seconds); writes every kernel to out_dir / file_name and
    returns {kind: seconds}, the kernels' total, the wall time and the idle time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = run()
        torch.cuda.synchronize()
    times: Dict[str, float] = {}
    for avg in prof.key_averages():
        device_us = getattr(avg, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(avg, "self_cuda_time_total", 0)
        if device_us > 0:
            times[avg.key] = times.get(avg.key, 0.0) + device_us / 1e6
    kinds = group_kernels(times)
    busy = sum(times.values())
    lines = [f"wall {wall:.3f} s, kernels {busy:.3f} s, idle {wall - busy:.3f} s", ""]
    lines += [f"{s:10.4f} s  {kind_of_kernel(name):<24} {name}"
              for name, s in sorted(times.items(), key=lambda kv: -kv[1])]
    (out_dir / file_name).write_text("\n".join(lines) + "\n")
    return {"kinds": kinds, "kernel_seconds": busy, "wall_seconds": wall, "idle_seconds": wall - busy}


def format_profile(p: Dict[str, object]) -> List[str]:
    wall = p["wall_seconds"]
    # Under programmatic dependent launch a kernel starts (and waits) while the one before it runs, so
    # kernel times overlap and their sum can pass the wall time: then "idle" is that overlap, negative.
    idle = "device idle (host gaps)" if p["idle_seconds"] >= 0 else "kernels overlapping (PDL)"
    rows = sorted(p["kinds"].items(), key=lambda kv: -kv[1]) + [(idle, p["idle_seconds"])]
    return [f"    {kind:<26}{s:>9.3f} s {100 * s / wall:>5.1f}%" for kind, s in rows]

"""kernels/precompile.py: noting Triton variants instead of launching them, compiling them in a
worker process, and the later launch finding them in the on-disk cache.

No GPU is needed: Triton compiles for an sm_90 target offline (its own ptxas). The check runs in a
subprocess, because this suite turns on Triton's interpreter (TRITON_INTERPRET=1) on CPU boxes, under
which kernels are never JIT-compiled."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from kernels.precompile import KernelPrecompiler, _OfflineDriver, count_compiles


class CpuDriver(_OfflineDriver):  # lets a launch on CPU tensors reach Triton's compile step
    def get_current_stream(self, device):
        return 0


norm = importlib.import_module("kernels.rms_norm")  # `kernels.rms_norm` the attribute is the op
driver.set_active(CpuDriver(GPUTarget("cuda", 90, 32)))
x = torch.ones(3, 64, dtype=torch.float16)
w = torch.ones(64, dtype=torch.float16)
pre = KernelPrecompiler(workers=1)
pre.start()
with pre.record() as noted:
    y = norm.rms_norm(x, w, 1e-6)
    norm.rms_norm(x, w, 1e-6)  # the same variant: noted once
    norm.fused_add_rms_norm(x, x, w, 1e-6)  # another (HAS_RESIDUAL=True)
assert len(noted) == 2, noted
print("recorded", len(noted))

report = pre.compile()
assert report.variants == 2 and not report.failed, report
print("compiled", report.variants, "in", round(report.seconds, 2), "s")

hits = []
knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
with count_compiles() as names:
    for variant in noted.values():
        norm._rms_norm_kernel.preload(variant.specialization)  # what a launch would compile
assert hits == [True, True], hits  # both found on disk: the worker compiled them
assert len(names) == 2 and names[0].startswith("_rms_norm_kernel(") and "HAS_RESIDUAL" in names[0], names
print("ok", names[0])
"""


def test_recorded_variants_compile_in_a_worker_into_the_disk_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELS_FORCE_TRITON")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok _rms_norm_kernel(" in done.stdout

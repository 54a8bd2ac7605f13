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

import kernels.precompile as precompile
from kernels.precompile import KernelPrecompiler, _OfflineDriver, _SkippedLaunch, count_compiles


class CpuDriver(_OfflineDriver):  # lets a launch on CPU tensors reach Triton's compile step
    def get_current_stream(self, device):
        return 0


norm = importlib.import_module("kernels.rms_norm")  # `kernels.rms_norm` the attribute is the op
driver.set_active(CpuDriver(GPUTarget("cuda", 90, 32)))
x = torch.ones(3, 64, dtype=torch.float16)
w = torch.ones(64, dtype=torch.float16)
precompile.spawn_workers_early("cuda", 1)  # as LLM does before reading config.json
pre = KernelPrecompiler(workers=1)
pre.start()
assert precompile._early is None and pre._pool is not None  # the engine's precompiler took them over
with pre.record() as noted:
    y = norm.rms_norm(x, w, 1e-6)
    norm.rms_norm(x, w, 1e-6)  # the same variant: noted once
    norm.fused_add_rms_norm(x, x, w, 1e-6)  # another (HAS_RESIDUAL=True)
assert len(noted) == 2, noted
cached = [k for c in norm._rms_norm_kernel.device_caches.values() for k in c[0].values()]
assert not any(isinstance(k, _SkippedLaunch) for k in cached), cached  # no launch is left a no-op
print("recorded", len(noted))

report = pre.compile()
assert report.variants == 2 and not report.failed and report.compiled_here == 0, report
print("compiled", report.variants, "in", round(report.seconds, 2), "s")
for jit_cache in norm._rms_norm_kernel.device_caches.values():
    jit_cache[0].clear()  # forget what compile() loaded: the launch below must go to the disk

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


ENGINE_SCRIPT = r"""
import json, sys
from framework import FrameworkConfig, SamplingParams
from framework.llm import LLM
from kernels.precompile import count_compiles
cfg = FrameworkConfig()
cfg.model.path, cfg.model.device, cfg.model.dtype = sys.argv[1], "cuda", "bfloat16"
cfg.cache.block_size, cfg.cache.max_model_len, cfg.cache.max_num_seqs = 8, 256, 8
cfg.cache.max_num_batched_tokens, cfg.cache.gpu_memory_utilization = 256, 0.5
cfg.compilation.compile_workers = 2
prompts = json.loads(sys.argv[2])
with LLM(cfg) as llm:
    rank0 = llm.stats()["ranks"][0]
    with count_compiles() as late:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
keys = ("precompile_variants", "precompile_workers", "precompile_failed", "precompile_compiled_here")
print(json.dumps({**{k: rank0[k] for k in keys}, "late": late, "lengths": [len(o.token_ids) for o in outputs]}))
"""


@pytest.mark.gpu
def test_engine_start_up_leaves_no_variant_for_the_requests(tiny_model, tmp_path):
    """On a GPU the runner precompiles start-up's variants; a batch of prompts of several lengths
    (prefill, mixed and graph-replayed decode steps) then compiles no Triton variant of its own.
    In a fresh process, as a server starts: in pytest's, earlier tests' engines have loaded kernels
    already (on the H200 that process loaded 10 of the variants here rather than from the workers)."""
    import json
    from helpers import PROMPTS
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    done = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(tiny_model("llama")), json.dumps(PROMPTS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0 = json.loads(done.stdout.strip().splitlines()[-1])
    assert rank0["precompile_variants"] > 0 and rank0["precompile_workers"] == 2
    assert rank0["precompile_failed"] == 0 and rank0["precompile_compiled_here"] == 0
    assert rank0["lengths"] == [12] * len(PROMPTS)
    assert rank0["late"] == [], rank0["late"]


NO_GUARD_SCRIPT = r"""
import os
print("top level ran", flush=True)  # a script without `if __name__ == "__main__"`
from kernels.precompile import KernelPrecompiler
pre = KernelPrecompiler(workers=2)
pre.start()
assert pre._pool.submit(os.getpid).result() != os.getpid()
pre.close()
"""


def test_workers_do_not_rerun_the_callers_script(tmp_path):
    """Spawned processes re-run the parent's __main__; a user's script without a main guard would
    run its top level once per worker (and fail there). The pool hides __main__ while it starts."""
    script = tmp_path / "script.py"
    script.write_text(NO_GUARD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("top level ran") == 1, done.stdout + done.stderr

"""Compile the Triton kernel variants a block of code launches, all at once, in worker processes.

Triton compiles a kernel variant (one per dtype, constexpr values, and integer and pointer
specializations: 1, a multiple of 16, 16-byte alignment) at its first launch, on the launching
thread, one after another. On a fresh machine (empty Triton cache) the engine's start-up spent about
12 of its 25 s that way. Threads do not help: most of a compile holds the GIL (the AST walk and the
MLIR passes; two threads compiled four decode-attention variants no faster than one). Processes do.

`record()` runs a block with Triton's `jit_cache_hook` set: each variant that is not compiled yet is
noted and its launches skipped (the hook answering True tells Triton it was handled), so the block's
kernels write nothing and its outputs are garbage the caller throws away. A pool of spawned
processes compiles each noted variant at once, while the block goes on, into the shared on-disk
cache, for the parent's target, without touching the GPU; `compile()` waits for them and loads each
from there (`JITFunction.preload`, the cache's own reader: a variant a worker failed on is compiled
here, as before; the pool only saves time). The block, run again for real, finds every variant loaded.

On Triton versions whose launch stubs are C modules built per signature (3.6 builds each with the C
compiler), the workers build those into the cache too.
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import sys
import time
import types
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from kernels._triton import HAS_TRITON

log = logging.getLogger(__name__)
MAX_WORKERS = 16  # past this, the longest single compile bounds the time anyway


@dataclass(frozen=True)
class Variant:
    """One compilation of one kernel: where the @triton.jit function lives, and Triton's own
    description of the variant (the JSON that `JITFunction.preload` reads)."""
    module: str
    name: str
    specialization: str


@dataclass
class CompileReport:
    variants: int = 0
    workers: int = 0
    seconds: float = 0.0  # from submitting the first variant to the last one loaded here
    failed: List[str] = field(default_factory=list)  # "module.name: error" from a worker
    compiled_here: int = 0  # variants this process did not find on disk after the workers (failed ones)


def default_workers(processes: int = 1) -> int:
    """The CPUs this process may use, shared among `processes` (tensor-parallel ranks on one host),
    less one for that process's own work (the workers start while it reads the config and builds the
    model), at most MAX_WORKERS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus // max(1, processes) - 1))


class _OfflineDriver:
    """What `JITFunction.preload` and `triton.compile` ask of Triton's driver, answered for a fixed
    target, so that a worker compiles for the parent's GPU without initializing CUDA itself."""

    def __init__(self, target: Any):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


def _init_worker() -> None:
    """Once per worker, while the parent does other work: import Triton and the kernels."""
    import kernels  # noqa: F401  (every kernel module: the JIT functions the variants name)


def _build_launcher(kernel: Any, target: Any) -> None:
    """Triton 3.6 builds a C launch stub per kernel signature, at the kernel's first launch; build it
    here so the parent finds it in the cache. Later versions launch through one generic stub (their
    CudaLauncher reads the active driver, which has none here: nothing to do)."""
    if getattr(target, "backend", None) != "cuda":
        return
    try:
        from triton.backends.nvidia.driver import CudaLauncher
        CudaLauncher(kernel.src, kernel.metadata)
    except Exception as exc:  # the parent builds it at launch, as it always did
        log.debug("no launch stub built for %s: %s", getattr(kernel, "name", "?"), exc)


def compile_variant(variant: Variant, target: Any) -> float:
    """Compile one variant into Triton's on-disk cache for `target`; returns the seconds it took.
    Runs in a worker process: it makes the offline driver the active one for good."""
    from triton.runtime.driver import driver
    start = time.perf_counter()
    driver.set_active(_OfflineDriver(target))
    jit = getattr(importlib.import_module(variant.module), variant.name)
    kernel = jit.preload(variant.specialization)
    _build_launcher(kernel, target)
    return time.perf_counter() - start


class _SkippedLaunch:
    """Stands in Triton's in-memory cache for a noted variant while a block is recorded: Triton
    "launches" it, which does nothing. Without it each launch of a noted variant would go through
    Triton's compile preamble again (option parsing, the hook's JSON: 116 us a launch against 8 us on
    a slow CPU; start-up's steps make about ten thousand launches). `record` takes every one out
    again before it returns."""
    function = packed_metadata = None

    def launch_metadata(self, *args: Any) -> None:
        return None

    def run(self, *args: Any) -> None:
        return None


@contextmanager
def _main_hidden() -> Iterator[None]:
    """A spawned process first re-runs the parent's __main__: a user's script, top level and all,
    without an `if __name__ == "__main__"` guard. The workers need only the kernels, so while they
    start __main__ is an empty module and they import none."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent may hold a CUDA context, which a forked child must not touch
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    # one trivial task per worker: the pool starts a process per waiting task, there and then, so all
    # of them start now (with __main__ hidden) and import while the caller goes on
    with _main_hidden():
        for _ in range(workers):
            pool.submit(os.getpid)
    return pool


_early: Optional[Tuple[int, ProcessPoolExecutor]] = None  # (workers, pool) spawned before the engine


def spawn_workers_early(device_type: str, workers: Optional[int]) -> None:
    """Start the compile workers before the engine exists (`LLM` does so before reading config.json),
    so that their imports (torch, Triton, the kernels: seconds, a dozen processes at once) overlap the front door's
    work; the engine's KernelPrecompiler takes them over. Nothing happens off CUDA or with 0 workers."""
    global _early
    n = default_workers() if workers is None else workers
    if device_type == "cuda" and HAS_TRITON and n >= 1 and _early is None:
        _early = (n, _spawn_pool(n))


def release_early_workers() -> None:
    """Stop workers no engine took over (ranks in other processes, or start-up failed)."""
    global _early
    if _early is not None:
        _early[1].shutdown(wait=False, cancel_futures=True)
        _early = None


class KernelPrecompiler:
    """Notes the Triton variants a block launches (`record`) and has worker processes compile each
    as soon as it is noted; `compile` waits for them. `start` spawns the workers (or takes over
    those spawn_workers_early started), so that their imports overlap the caller's work."""

    def __init__(self, workers: int):
        self.workers = workers
        self.variants: Dict[str, Variant] = {}
        self._pool: Optional[ProcessPoolExecutor] = None
        self._target: Any = None
        self._futures: Dict[Future, Variant] = {}

    def start(self) -> None:
        global _early
        if self._pool is not None or self.workers < 1:
            return
        if _early is not None and _early[0] == self.workers:
            self._pool, _early = _early[1], None
        else:
            self._pool = _spawn_pool(self.workers)

    def _submit(self, variant: Variant) -> None:
        if self._pool is None:
            return
        if self._target is None:
            from triton.runtime.driver import driver
            self._target = driver.active.get_current_target()
        try:
            future = self._pool.submit(compile_variant, variant, self._target)
        except Exception as exc:  # a worker died (the pool is broken): the rest compile at their launch
            log.warning("Triton compile workers stopped (%s); the remaining variants compile at their launch", exc)
            self.close()
            return
        self._futures[future] = variant

    @contextmanager
    def record(self) -> Iterator[Dict[str, Variant]]:
        """Inside the block, Triton launches of uncompiled variants are skipped and noted."""
        from triton import knobs
        stubbed: List[tuple] = []  # (kernel cache, key) holding a _SkippedLaunch

        def note(*, key: Any, fn: Any, compile: Dict[str, Any], **_: Any) -> bool:
            module, name, jit = fn.module, fn.name, fn.jit_function
            if getattr(sys.modules.get(module), name, None) is not jit:
                return False  # not reachable by its name (defined in a function): launched and compiled here
            variant = Variant(module, name, compile["specialization_data"])
            if self.variants.setdefault(f"{module}.{name}:{key}", variant) is variant:
                self._submit(variant)
            cache = jit.device_caches[compile["device"]][0]
            cache[key] = _SkippedLaunch()
            stubbed.append((cache, key))
            return True  # handled: Triton skips the compile and this launch

        previous = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = note
        try:
            yield self.variants
        finally:
            knobs.runtime.jit_cache_hook = previous
            for cache, key in stubbed:  # never leave a launch that does nothing
                if isinstance(cache.get(key), _SkippedLaunch):
                    del cache[key]

    def compile(self) -> CompileReport:
        """Wait for the workers, loading each variant here as it is done; stop the pool. Without
        workers nothing happens: each variant compiles at its first launch."""
        report = CompileReport(variants=len(self.variants), workers=self.workers)
        start = time.perf_counter()
        submitted = set(self._futures.values())
        if self._pool is None and any(v not in submitted for v in self.variants.values()):
            self.start()  # noted before the pool started: compile them now
        for variant in self.variants.values():
            if variant not in submitted:
                self._submit(variant)
        for future in as_completed(self._futures):  # load each while the workers compile the rest
            variant = self._futures[future]
            if future.exception() is not None:
                report.failed.append(f"{variant.module}.{variant.name}: {future.exception()}")
            report.compiled_here += not self._load(variant)
        self._futures.clear()
        self.close()
        report.seconds = time.perf_counter() - start
        return report

    @staticmethod
    def _load(variant: Variant) -> bool:
        """Load a variant into its kernel's in-memory cache (Triton's disk-cache reader): True when
        it came from disk, False when it had to be compiled here (or failed: then at its launch)."""
        from triton import knobs
        hits: List[bool] = []
        previous = knobs.compilation.listener
        knobs.compilation.listener = lambda **kw: hits.append(bool(kw.get("cache_hit")))
        try:
            getattr(sys.modules[variant.module], variant.name).preload(variant.specialization)
        except Exception as exc:
            log.warning("Triton variant of %s.%s not loaded (it compiles at its launch): %s",
                        variant.module, variant.name, exc)
            return False
        finally:
            knobs.compilation.listener = previous
        return hits == [True]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def precompiler_for(device_type: str, workers: Optional[int], ranks: int = 1) -> Optional[KernelPrecompiler]:
    """A precompiler for a CUDA engine with Triton (`workers` None: default_workers(ranks)), or None."""
    if device_type != "cuda" or not HAS_TRITON:
        return None
    n = default_workers(ranks) if workers is None else workers
    return KernelPrecompiler(n) if n >= 1 else None


def describe(jit: Any, compile: Dict[str, Any]) -> str:
    """A variant in a line: the kernel, its constexpr values (integers specialized to 1 among them)
    and the arguments specialized as 16-divisible (pointers aligned, integers multiples of 16)."""
    names = jit.arg_names
    consts = ", ".join(f"{names[path[0]]}={value}" for path, value in compile["constants"].items() if len(path) == 1)
    attrs = compile["configs"][0] if compile.get("configs") else {}
    divisible = ", ".join(names[path[0]] for path, spec in attrs.items() if len(path) == 1 and spec)
    return f"{jit.__name__}({consts}; 16-divisible: {divisible or '-'})"


@contextmanager
def count_compiles() -> Iterator[List[str]]:
    """The Triton variants compiled in this process inside the block (one name each; a disk-cache
    hit counts too): every one is a variant start-up did not prepare."""
    if not HAS_TRITON:
        yield []
        return
    from triton import knobs
    names: List[str] = []
    previous = knobs.runtime.jit_post_compile_hook

    def note(*, fn: Any, compile: Dict[str, Any], **kwargs: Any) -> None:
        names.append(describe(fn.jit_function, compile))
        if previous is not None:
            previous(fn=fn, compile=compile, **kwargs)

    knobs.runtime.jit_post_compile_hook = note
    try:
        yield names
    finally:
        knobs.runtime.jit_post_compile_hook = previous

"""What a rank actually used: peak memory, KV cache size, load time. Read after a run."""
from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any, Dict

import torch

GiB = 1 << 30


def reset_peak_rss() -> None:
    """Start a new peak: a multirun runs every job in one process, and each job's peak is its own.
    Linux resets VmHWM when "5" is written to clear_refs; elsewhere the peak stays the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set since the last reset_peak_rss (Linux VmHWM), else of the process
    (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters plus persistent buffers (the scales a quantization method computes at load),
    each tensor once (a tied lm_head is the embedding). Non-persistent buffers, such as the
    rotary cos/sin tables, are caches rebuilt from config.json, not weights."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rank_stats(engine: Any) -> Dict[str, Any]:
    runner = engine.runner
    stats: Dict[str, Any] = {
        "device": str(runner.device),
        "dtype": str(runner.dtype).replace("torch.", ""),
        "load_seconds": round(runner.load_seconds, 3),
        "bytes_read": runner.load_stats.bytes_read,
        "weight_bytes": weight_bytes(runner.model),
        "kv_blocks": runner.num_blocks,
        "kv_tokens": runner.num_blocks * runner.kv_spec.block_size,
        "kv_bytes": (runner.num_blocks * runner.kv_spec.bytes_per_block
                     + runner.num_window_blocks * runner.kv_spec.window_bytes_per_block),
        "kv_window_blocks": runner.num_window_blocks,  # the sliding-window layers' own pool (0: none)
        "num_preemptions": engine.scheduler.num_preemptions,
        "async_scheduling": runner.async_scheduling,
        "symm_all_reduce": runner.symm_all_reduce is not None,  # TP on GPUs: peer-memory all-reduce in use
    }
    vision = getattr(runner.model, "vision_modules", lambda: [])()
    if hasattr(runner.model, "vision_modules"):  # a vision-language model: 0 when text-only
        stats["vision_weight_bytes"] = sum(weight_bytes(m) for m in vision)
    if getattr(engine, "mm_processor", None) is not None:
        stats["mm_processor_cache"] = engine.mm_processor.cache.stats.as_dict()
        stats["encoder_cache"] = engine.encoder_cache.stats.as_dict()
    if runner.device.type == "cuda":
        stats["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(runner.device)
        free, total = torch.cuda.mem_get_info(runner.device)
        stats["device_used_bytes"] = total - free
        # compilation level, CUDA graph sizes/pool/capture time, the KV budget's terms (model_runner)
        stats.update(runner.gpu_stats())
    else:
        stats["peak_rss_bytes"] = peak_rss_bytes()
    return stats

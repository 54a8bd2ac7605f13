"""Every `auto` and null of a config turned into the value a run uses, once, before anything is built.

`resolve_config` returns a copy of the config in which
- `quantization.method` is how the weights will be held (none, int8, fp8, int4: a sharded
  folder's manifest, else the checkpoint's quantization_config, for `auto`), with its group size;
- `cache.max_model_len` and `cache.max_num_seqs` are numbers (null = the model's limit; `auto` =
  the largest that fits, searched by the memory planner);
- `cache.max_num_batched_tokens` is a number (null = by the device: default_max_num_batched_tokens);
- `compilation.cudagraph_capture_sizes` is the list of decode sizes that will be captured;
- `model.tokenizer`, when set, is a folder holding a tokenizer (a hub id: its folder in the HF cache).
The engine, the ranks and metrics.json all receive this resolved config and never resolve again.

The helpers below (device, dtype, the model's own length limit, the capture sizes) are what both
the planner and the engine need; they live here so neither imports the other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import torch

from framework.config.schema import FrameworkConfig
from framework.layers.quantization import resolve_quantization

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_DEFAULT_CAPTURE_SIZE = 256
# cache.max_num_batched_tokens=null: tokens a step by the device. A GPU of this much memory or more
# (H100, H200) gets the larger budget, as in vLLM: fewer, fuller prefill steps, each reading the
# weights once for more tokens, and the batch reaches max_num_seqs sooner (BENCHMARKS.md, H200).
LARGE_GPU_BYTES = 70 << 30
BATCHED_TOKENS_LARGE_GPU = 8192
BATCHED_TOKENS_DEFAULT = 2048


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, hf_config: Any) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slow and less exact
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = DTYPES.get(str(ckpt).replace("torch.", ""), torch.bfloat16)
    return torch.bfloat16 if ckpt == torch.float32 else ckpt


def model_max_len(hf_config: Any) -> int:
    from framework.models.registry import RUNS_SLIDING_WINDOW
    text = getattr(hf_config, "text_config", None) or hf_config
    limit = text.max_position_embeddings
    window = getattr(text, "sliding_window", None)
    runs_window = any(a in RUNS_SLIDING_WINDOW for a in getattr(hf_config, "architectures", None) or [])
    if window and getattr(text, "use_sliding_window", True) and not runs_window:
        limit = min(limit, window)  # a window our model does not apply: stay inside one window
    return limit


def default_max_num_batched_tokens(device_memory_bytes: Optional[int]) -> int:
    """What cache.max_num_batched_tokens=null means on this device (None: the CPU backend)."""
    if device_memory_bytes is not None and device_memory_bytes >= LARGE_GPU_BYTES:
        return BATCHED_TOKENS_LARGE_GPU
    return BATCHED_TOKENS_DEFAULT


def default_capture_sizes(max_num_seqs: int) -> List[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 256); max_num_seqs itself is added
    when that list misses it, so every decode batch the scheduler can form has a graph."""
    cap = min(max_num_seqs, MAX_DEFAULT_CAPTURE_SIZE)
    sizes = [s for s in [1, 2, 4, 8] + list(range(16, cap + 1, 8)) if s <= cap]
    if sizes[-1] < cap:
        sizes.append(cap)
    return sizes


def capture_sizes(requested: Optional[List[int]], max_num_seqs: int) -> List[int]:
    """The sizes to capture: the requested ones (or the defaults) up to the first that covers
    max_num_seqs; larger ones could never be replayed."""
    if requested is None:
        return default_capture_sizes(max_num_seqs)
    sizes = sorted(set(int(s) for s in requested))
    covering = [s for s in sizes if s >= max_num_seqs]
    return [s for s in sizes if s < max_num_seqs] + covering[:1]


def load_time_method(cfg: FrameworkConfig) -> Optional[str]:
    """A task=save_sharded folder's method when it quantized at load (config.json has no trace)."""
    if cfg.model.load_format != "sharded":
        return None
    from framework.loader.resolve import resolve_model_path
    from framework.loader.sharded import Manifest
    return Manifest.read(resolve_model_path(cfg.model.path)).load_time_method


def is_resolved(cfg: FrameworkConfig) -> bool:
    return (cfg.quantization.method != "auto" and isinstance(cfg.cache.max_model_len, int)
            and isinstance(cfg.cache.max_num_seqs, int) and isinstance(cfg.cache.max_num_batched_tokens, int)
            and cfg.compilation.cudagraph_capture_sizes is not None)


def resolve_config(cfg: FrameworkConfig, hf_config: Any, device_memory_bytes: Optional[int]) -> FrameworkConfig:
    """A resolved copy of `cfg` (see the module docstring); `device_memory_bytes` is the GPU's
    total memory the `auto` limits are searched for, None for the CPU backend."""
    if is_resolved(cfg):
        return cfg
    quant = resolve_quantization(cfg.quantization, hf_config, load_time_method(cfg))
    if cfg.model.load_format == "sharded":  # refused now, before any plan is printed or rank started
        from framework.loader.resolve import resolve_model_path
        from framework.loader.sharded import Manifest
        folder = resolve_model_path(cfg.model.path)
        Manifest.read(folder).check(folder, cfg.parallelism.tensor_parallel_size, quant.method)
    out = dataclasses.replace(cfg, quantization=quant)
    if cfg.model.tokenizer:  # a folder or a cached hub id, checked here once; ranks get the folder
        from framework.loader.resolve import resolve_tokenizer_path
        out.model = dataclasses.replace(cfg.model, tokenizer=str(resolve_tokenizer_path(cfg.model.tokenizer)))
    length, seqs = cfg.cache.max_model_len, cfg.cache.max_num_seqs
    if length is None:
        length = model_max_len(hf_config)
    tokens = cfg.cache.max_num_batched_tokens
    if tokens is None:
        tokens = default_max_num_batched_tokens(device_memory_bytes)
    out.cache = dataclasses.replace(cfg.cache, max_model_len=length, max_num_batched_tokens=tokens)
    if "auto" in (length, seqs):
        from framework.memory.planner import resolve_auto_limits  # the planner resolves configs too
        length, seqs = resolve_auto_limits(out, hf_config, device_memory_bytes)
    out.cache = dataclasses.replace(cfg.cache, max_model_len=int(length), max_num_seqs=int(seqs),
                                    max_num_batched_tokens=int(tokens))
    out.compilation = dataclasses.replace(
        cfg.compilation, cudagraph_capture_sizes=capture_sizes(cfg.compilation.cudagraph_capture_sizes, int(seqs)))
    return out


def auto_notes(requested: FrameworkConfig, resolved: FrameworkConfig) -> List[str]:
    """One line per value that `auto` chose, for the plan and the log."""
    notes = [f"cache.{key}=auto -> {getattr(resolved.cache, key)}, the largest that fits"
             for key in ("max_model_len", "max_num_seqs") if getattr(requested.cache, key) == "auto"]
    if requested.cache.max_num_batched_tokens is None:
        notes.append(f"cache.max_num_batched_tokens=null -> {resolved.cache.max_num_batched_tokens} for this device")
    if requested.quantization.method == "auto":
        notes.append(f"quantization.method=auto -> {resolved.quantization.method}"
                     + (f" (group_size {resolved.quantization.group_size})"
                        if resolved.quantization.method == "int4" else ""))
    return notes


def config_dict(cfg: FrameworkConfig) -> dict:
    """The resolved config as plain data, for metrics.json."""
    data = dataclasses.asdict(cfg)
    data["compilation"]["level"] = int(cfg.compilation.level)
    return data


__all__ = ["resolve_config", "auto_notes", "config_dict", "pick_device", "pick_dtype", "model_max_len",
           "capture_sizes", "default_capture_sizes", "is_resolved"]

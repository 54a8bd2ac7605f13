"""Loading weights into a model: from safetensors (each rank reading only its slices) or random.

Checkpoint tensors are handed to each parameter's `weight_loader` as a LazyTensor, so a
column- or row-parallel layer reads just its own rows or columns from the memory-mapped file.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from framework.config.errors import UserError


@dataclass
class LoadStats:
    bytes_read: int = 0
    seconds: float = 0.0
    num_tensors: int = 0


class LazyTensor:
    """A checkpoint tensor not yet read: `narrow` reads a slice, `materialize` the whole."""

    def __init__(self, file_slice, stats: LoadStats, ranges: Tuple[slice, ...] = ()):
        self.file_slice, self.stats, self.ranges = file_slice, stats, ranges
        full = list(file_slice.get_shape())
        self.shape = torch.Size([len(range(*r.indices(n))) if i < len(ranges) else n
                                 for i, (n, r) in enumerate(zip(full, list(ranges) + [slice(None)] * len(full)))])

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        ranges = list(self.ranges) + [slice(None)] * (dim + 1 - len(self.ranges))
        base = ranges[dim].start or 0
        ranges[dim] = slice(base + start, base + start + length)
        return LazyTensor(self.file_slice, self.stats, tuple(ranges))

    def materialize(self) -> torch.Tensor:
        tensor = self.file_slice[self.ranges] if self.ranges else self.file_slice[:]
        self.stats.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def checkpoint_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors files in {folder}; use model.load_format=dummy for random weights")
    return files


def iterate_checkpoint(folder: Path, stats: LoadStats) -> Iterator[Tuple[str, LazyTensor]]:
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, LazyTensor(f.get_slice(name), stats)


def count_tensors(folder: Path) -> int:
    total = 0
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            total += len(f.keys())
    return total


def load_safetensors(model: nn.Module, folder: Path) -> LoadStats:
    stats = LoadStats()
    start = time.perf_counter()
    params: Dict[str, nn.Parameter] = {model.checkpoint_name(n): p for n, p in model.named_parameters()}
    packed = getattr(model, "packed_modules", {})
    # a model whose checkpoint layout differs from transformers' (InternVL2's internvl_chat) renames
    # and splits each tensor first
    rewrite = getattr(model, "checkpoint_tensors", lambda name, tensor: [(name, tensor)])
    loaded = set()
    # a bar only on a terminal: quiet in tests, CI and logs
    entries = tqdm(iterate_checkpoint(folder, stats), total=count_tensors(folder), desc="loading weights",
                   unit="tensor", leave=False, disable=not sys.stderr.isatty())
    for name, tensor in ((n, t) for entry in entries for n, t in rewrite(*entry)):
        target, shard_id = name, None
        for ckpt_part, (ours, shard) in packed.items():
            if f".{ckpt_part}." in name:
                fused = name.replace(f".{ckpt_part}.", f".{ours}.")
                if fused in params:  # a vision tower keeps its gate_proj / up_proj unfused
                    target, shard_id = fused, shard
                break
        param = params.get(target)
        if param is None:  # rotary caches and the like; tied lm_head arrives as embed_tokens
            continue
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            if loader is None:  # replicated (norms): the whole tensor
                param.copy_(tensor.materialize())
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        loaded.add(target)
        stats.num_tensors += 1
    tied = {n for n, p in params.items() if any(p is q for m, q in params.items() if m in loaded)}
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise UserError(f"checkpoint {folder} lacks weights: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    stats.seconds = time.perf_counter() - start
    return stats


def init_dummy(model: nn.Module, seed: int) -> LoadStats:
    """Random weights for benchmarks and memory tests: small uniform values, norms at one."""
    start = time.perf_counter()
    gens: Dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if param.device not in gens:  # generated where the weights live: no host copy of 16 GB
                gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            fill = getattr(param, "fill_dummy", None)  # quantized storage: codes of random weights
            if fill is not None:
                fill(gens[param.device])
                continue
            param.uniform_(-0.05, 0.05, generator=gens[param.device])
    return LoadStats(seconds=time.perf_counter() - start)

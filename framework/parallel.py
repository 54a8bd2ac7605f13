"""Tensor-parallel rank and collectives. Without an initialized process group: rank 0 of 1.

The launcher (launchers/) initializes torch.distributed and the model runner asks who it is
(`tp_rank`, `tp_size`) once, to build the model's context (models/context.py); layers know their
rank from that context and reduce or gather through here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelInfo:
    """One rank's place in its tensor-parallel group, as a model is told it (models/context.py)."""

    rank: int = 0
    size: int = 1
    one_host: bool = True  # every rank's GPU on this host: peer memory can join them


# Steps are pickled Python objects: with NCCL they would make a round trip through the GPU
# and sync it every step, so the launcher adds a gloo group for them (None: the default group).
_step_group = None


def set_step_group(group) -> None:
    global _step_group
    _step_group = group


def step_group():
    return _step_group


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# The peer-memory all-reduce for small messages (framework/symm_all_reduce.py), set by the
# model runner on CUDA ranks when parallelism.custom_all_reduce is on; None: NCCL (or gloo) only.
_symm_all_reduce = None


def set_symm_all_reduce(reducer) -> None:
    global _symm_all_reduce
    _symm_all_reduce = reducer


def all_reduce(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sum over the `size` ranks of the group (a no-op for one). Use the returned tensor: the
    peer-memory path returns a new one."""
    if size == 1:
        return x
    if _symm_all_reduce is not None and _symm_all_reduce.takes(x):
        return _symm_all_reduce(x)
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    """Concatenate each of the `size` ranks' slice of the last dimension (vocab-parallel logits)."""
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, f"{numerator} is not divisible by {denominator}"
    return numerator // denominator

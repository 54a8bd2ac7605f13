"""Tensor-parallel rank and collectives. Without an initialized process group: rank 0 of 1.

The launcher (launchers/) initializes torch.distributed; layers only ask who they are and
reduce or gather through here, so the same model code runs at any TP size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


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


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's slice of the last dimension (vocab-parallel logits)."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, f"{numerator} is not divisible by {denominator}"
    return numerator // denominator

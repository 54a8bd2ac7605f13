"""All-reduce of small messages through NVLink peer memory, for tensor-parallel steps on GPUs.

A decode step of a Llama-shaped model makes two all-reduces a layer, each one hidden row per
sequence: 8 KB at batch 1, 2 MB at 256 sequences (the 8B shape). NCCL's ring pays its
protocol's latency on each of them however small: 17-21 us up to 256 KB on two H200s, most of
a TP=2 batch-1 step. Here each rank copies its input into a buffer that every peer has mapped
and the ranks sum each other's copies directly:
  one-shot (up to 512 KB): one wait for all peers, then every rank sums all copies: 6-11 us;
  two-shot (larger): each rank sums a 1/N slice and the slices are gathered, so each byte
    crosses NVLink once: 17 us at 2 MB against NCCL's 39.
(BENCHMARKS.md, "tensor parallelism on two H200s"; `python -m kernels.bench_all_reduce`.)
Messages past the buffer (prefill chunks) go to NCCL, which is as fast there.

PyTorch's symmetric memory (torch.distributed._symmetric_memory) owns the peer-mapped buffer
and the kernels; they are captured and replayed inside CUDA graphs like any other kernel.
Only its peer-to-peer kernels are used, never NVLink multicast (`multimem_*`): multicast is
switched off before the buffer is made, so no multicast object is ever created.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 << 20  # the buffer; larger messages go to NCCL
ONE_SHOT_MAX_BYTES = 512 << 10  # where two-shot overtakes one-shot at TP=2 (both ~11 us)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SymmAllReduce:
    """Sum over the ranks of `group` for CUDA tensors of up to `max_bytes`; `takes(x)` says which."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # before the buffer: peer-to-peer only
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name, self.world_size = group.group_name, group.size()
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)  # collective: maps every peer's buffer

    def takes(self, x: torch.Tensor) -> bool:
        # The kernels move 16-byte words, each rank's two-shot slice too: other sizes go to NCCL
        # (a model's messages are rows x hidden size, always whole words).
        return (x.dtype == self.dtype and x.numel() <= self.max_numel and x.is_contiguous()
                and (x.numel() * x.element_size()) % (16 * self.world_size) == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A new tensor holding the sum; `x` is left as it was."""
        return self.one_shot(x) if x.numel() * x.element_size() <= ONE_SHOT_MAX_BYTES else self.two_shot(x)

    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[:x.numel()].view_as(x)  # the op copies x here first
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", self.group_name)

    def two_shot(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[:x.numel()].view_as(x)
        staging.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_(staging, "sum", self.group_name)
        return staging.clone()  # the buffer is the next message's


def make_symm_all_reduce(group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype):
    """A SymmAllReduce, or None (NCCL for every message) where this torch or machine has none:
    the speed differs, the sums do not, so the reason is logged and the run goes on."""
    if device.type != "cuda" or dtype not in DTYPES:
        return None
    made = None
    try:
        made = SymmAllReduce(group, device, dtype)
    except Exception as exc:  # an old torch, no peer access between these GPUs, an IPC refusal
        log.warning("parallelism.custom_all_reduce: peer-memory all-reduce unavailable here (%s: %s); "
                    "every all-reduce goes through NCCL", type(exc).__name__, exc)
    # Every rank must take the same path for every message, or the collectives never meet.
    everywhere = torch.tensor([made is not None], dtype=torch.int32, device=device)
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=group)
    return made if everywhere.item() else None

"""Linear layers split over tensor-parallel ranks.

Each weight carries a `weight_loader(param, checkpoint_tensor, shard_id)` that copies in this
rank's slice, so one loading loop serves replicated, split and merged (QKV, gate/up) weights.
The checkpoint tensor may be lazy (loader.LazyTensor): `narrow` then reads only this rank's
bytes from the safetensors file.

Where a slice lands is two questions every layer answers: `output_rows(shard_id)` (which of
our output rows, from which rows of the checkpoint tensor) and `input_cols` (which input
columns: all of them, except on a row-parallel layer). A quantization method (`quant`, from
layers/quantization) asks the same two questions, so it can quantize each block of rows as it
arrives and the model's full-precision weights never sit in memory at once.

An unquantized matmul is `kernels.linear`: F.linear, or on the GPU for decode-sized batches a
Triton GEMV that reads the weight closer to HBM bandwidth than cuBLAS does (kernels/gemv.py).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

import kernels
from framework.parallel import ParallelInfo, all_reduce, divide


def _copy(param: torch.Tensor, loaded) -> None:
    loaded = loaded.materialize() if hasattr(loaded, "materialize") else loaded
    assert param.shape == loaded.shape, f"shape mismatch: {tuple(param.shape)} vs {tuple(loaded.shape)}"
    param.copy_(loaded)


class LinearBase(nn.Module):
    """`quant` (a layers.quantization.QuantMethod) replaces `weight` with its own storage and
    matmul; the bias always stays in the model dtype. `tp` is this rank's place (models/context)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant=None,
                 tp: ParallelInfo = ParallelInfo()):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # this rank's shape
        self.quant, self.tp = quant, tp
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            quant.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def output_rows(self, shard_id=None) -> Tuple[int, int, int]:
        """(first row here, number of rows, first row in the checkpoint tensor) of one shard."""
        return 0, self.out_features, 0

    def input_cols(self, loaded, dim: int = 1, per: int = 1):
        """This rank's input columns of a checkpoint tensor whose `dim` holds `per` input
        features per entry (8 for int32-packed int4, group_size for group scales)."""
        return loaded

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        offset, size, start = self.output_rows(shard_id)
        loaded = loaded.narrow(0, start, size)
        if param.dim() == 2:  # the weight; a bias has no input dimension
            loaded = self.input_cols(loaded)
        _copy(param.data.narrow(0, offset, size), loaded)

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.quant is None:
            return kernels.linear(x, self.weight, bias)
        return self.quant.apply(self, x, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant=None,
                 tp: ParallelInfo = ParallelInfo()):
        super().__init__(in_features, divide(out_features, tp.size), bias, quant, tp)

    def output_rows(self, shard_id=None) -> Tuple[int, int, int]:
        return 0, self.out_features, self.tp.rank * self.out_features


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up); shard_id is the index."""

    def __init__(self, in_features: int, output_sizes: List[int], bias: bool = False, quant=None,
                 tp: ParallelInfo = ParallelInfo()):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, quant, tp)

    def output_rows(self, shard_id: int = 0) -> Tuple[int, int, int]:
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        return offset, size, self.tp.rank * size


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul. Query heads split across ranks; KV heads too, or,
    when there are fewer KV heads than ranks, each KV head is replicated on tp/num_kv ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 quant=None, tp: ParallelInfo = ParallelInfo()):
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size)
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden, out, bias, quant, tp)

    def output_rows(self, shard_id: str = "q") -> Tuple[int, int, int]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q_size, self.tp.rank * q_size
        offset = q_size if shard_id == "k" else q_size + kv_size
        return offset, kv_size, (self.tp.rank // self.kv_replicas) * kv_size


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant=None,
                 tp: ParallelInfo = ParallelInfo()):
        super().__init__(divide(in_features, tp.size), out_features, bias, quant, tp)

    def input_cols(self, loaded, dim: int = 1, per: int = 1):
        cols = self.in_features // per
        return loaded.narrow(dim, self.tp.rank * cols, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.matmul(x), self.tp.size)  # the bias is added once, after the reduce
        return y + self.bias if self.bias is not None else y

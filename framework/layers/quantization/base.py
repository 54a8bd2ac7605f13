"""What a quantization method is, and the machinery every method shares.

A method owns a linear layer's weight storage and matmul: `create_weights` registers the
tensors, `apply` multiplies. Methods that quantize a full-precision checkpoint do it *at load
time, per block of output rows*: each weight_loader call hands over the rows of one shard
(column, QKV and merged layers) or this rank's input columns of every row (row-parallel), and
`quantize` turns exactly those rows into codes and scales. Every scale is per output row (or per
group of input columns within a row), so rows quantize independently and only one shard's
full-precision rows are ever in memory.

Storage naming: what a checkpoint provides is a Parameter (the loader finds it by name and
checks it arrived); what we derive at load time (the scales of a dynamic method) is a
persistent buffer, which the loader does not look for.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from typing import Dict, Tuple

import torch
from torch import nn

Spec = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype)


def materialize(loaded) -> torch.Tensor:
    """A checkpoint tensor (loader.LazyTensor or a plain tensor) read into memory."""
    return loaded.materialize() if hasattr(loaded, "materialize") else loaded


class QuantMethod(ABC):
    """One instance serves every linear layer of a model; per-layer state lives on the layer."""

    name = "base"
    # Tensors on a layer that are a second layout of the others (int4's tinygemm copy): a sharded
    # checkpoint leaves them out, and `rebuild` remakes them from the loaded ones.
    derived: tuple = ()

    def rebuild(self, layer: nn.Module) -> None:
        """Remake the layer's `derived` tensors from its loaded ones (nothing by default)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module) -> None: ...

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


class LoadTimeQuant(QuantMethod):
    """Quantizes a full-precision checkpoint as it loads. Subclasses say what they store
    (`storage`; the first entry is the codes, registered as `weight` so the checkpoint's
    `...weight` tensors reach it), how a block of rows becomes codes and scales (`quantize`),
    and how to multiply (`apply`)."""

    @abstractmethod
    def storage(self, out_features: int, in_features: int) -> Spec: ...

    @abstractmethod
    def quantize(self, layer: nn.Module, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        """float32 rows [n, in_features] -> each storage tensor's n rows (dtypes as on `layer`)."""

    def create_weights(self, layer: nn.Module) -> None:
        spec = self.storage(layer.out_features, layer.in_features)
        codes, *derived = spec
        shape, dtype = spec[codes]
        weight = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
        weight.weight_loader = partial(self.load_rows, layer)
        weight.fill_dummy = partial(self.fill_dummy, layer)
        layer.register_parameter(codes, weight)
        for name in derived:
            shape, dtype = spec[name]
            layer.register_buffer(name, torch.zeros(shape, dtype=dtype))

    def load_rows(self, layer: nn.Module, param: nn.Parameter, loaded, shard_id=None) -> None:
        offset, size, start = layer.output_rows(shard_id)
        block = materialize(layer.input_cols(loaded.narrow(0, start, size)))
        self.store(layer, offset, block.to(device=param.device, dtype=torch.float32))

    def store(self, layer: nn.Module, offset: int, w: torch.Tensor) -> None:
        for name, rows in self.quantize(layer, w).items():
            getattr(layer, name).narrow(0, offset, rows.shape[0]).copy_(rows)

    def fill_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        """load_format=dummy: the quantization of the random weights an unquantized model gets."""
        w = torch.empty(layer.out_features, layer.in_features, dtype=torch.float32, device=generator.device)
        self.store(layer, 0, w.uniform_(-0.05, 0.05, generator=generator))

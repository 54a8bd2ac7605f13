"""quantization.method=auto on a compressed-tensors checkpoint (the format llm-compressor writes).

What we read from config.json's `quantization_config`:
  quant_method: compressed-tensors
  format: int-quantized | float-quantized | naive-quantized | pack-quantized (top level or per group)
  config_groups: {group_0: {targets: [Linear], weights: {num_bits, type: int|float, symmetric,
                  strategy: channel|tensor|group, group_size, actorder}, input_activations: ...}}
  ignore: [lm_head]
Tensors of each quantized linear layer (`<layer>.` + name):
  int-/float-/naive-quantized: weight (int8 or float8_e4m3fn [out, in]) and weight_scale
      ([out, 1] for strategy channel, one value for strategy tensor)
  pack-quantized, 4 bits: weight_packed (int32 [out, in/8]: input column 8j+i in bits 4i..4i+3
      of word j, stored as q + 8), weight_shape, weight_scale ([out, in/group_size] or [out, 1])
The weight is (q - zero_point) * scale; only symmetric schemes (no zero point) are supported.

These map onto our own int8, fp8 and int4 storage, loaded as stored (nothing is re-quantized).
Activations (`input_activations`): fp8 weights with dynamic per-token fp8 activations
({num_bits: 8, type: float, strategy: token, dynamic: true, symmetric: true}) run W8A8 like
quantization=fp8 (fp8.py: fp8 tensor cores where the card has them), and int8 weights with
dynamic per-token int8 activations ({num_bits: 8, type: int, strategy: token, dynamic: true,
symmetric: true}: llm-compressor's W8A8 int8 scheme) like quantization=int8 (int8.py: int8 tensor
cores on CUDA past decode sizes). A checkpoint without input_activations runs weight-only, as its
author quantized it. Other activation schemes (static per-tensor `input_scale`, asymmetric)
run weight-only too, activations in the model dtype (at least as accurate), and say so in the
log; their `input_scale` tensors are not read.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from framework.config.errors import UserError
from framework.layers.quantization.base import QuantMethod, materialize
from framework.layers.quantization.fp8 import Fp8Method
from framework.layers.quantization.int4 import Int4Method
from framework.layers.quantization.int8 import Int8Method

log = logging.getLogger(__name__)
SUPPORTED = ("int8 (int-quantized, channel or tensor scales), fp8 e4m3 (float-quantized, channel or "
             "tensor scales), int4 (pack-quantized, group or channel scales); all symmetric")


@dataclass
class WeightScheme:
    format: str
    num_bits: int
    type: str  # int | float
    symmetric: bool
    strategy: str  # channel | tensor | group
    group_size: Optional[int]
    actorder: Optional[str]

    def describe(self) -> str:
        group = f" group_size={self.group_size}" if self.strategy == "group" else ""
        return (f"{self.format}: {self.num_bits}-bit {self.type} {self.strategy}{group} "
                f"{'symmetric' if self.symmetric else 'asymmetric'}")


def parse(qc: Dict[str, Any]) -> WeightScheme:
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") for g in groups]
    if not groups or any(w != weights[0] for w in weights) or weights[0] is None:
        raise UserError("compressed-tensors checkpoint: expected every config group to quantize weights "
                        f"the same way; found {weights}")
    if not any(t == "Linear" for g in groups for t in g.get("targets", [])):
        raise UserError("compressed-tensors checkpoint: only config groups targeting 'Linear' are supported; "
                        f"found targets {[g.get('targets') for g in groups]}")
    # `ignore` (layers kept in full precision) is answered per layer by quantization.QuantResolver
    w = weights[0]
    return WeightScheme(format=qc.get("format") or groups[0].get("format") or "", num_bits=w.get("num_bits"),
                        type=w.get("type", "int"), symmetric=w.get("symmetric", True),
                        strategy=w.get("strategy", ""), group_size=w.get("group_size"),
                        actorder=w.get("actorder"))


def stored_method(qc: Dict[str, Any]) -> Tuple[str, int]:
    """(int8 | fp8 | int4, group size; 0 = one scale per row) of the weights as stored."""
    return _method_name(from_config(qc, None)), parse(qc).group_size or 0


def _method_name(method: QuantMethod) -> str:
    return {CheckpointInt8: "int8", CheckpointFp8: "fp8", CheckpointInt4: "int4"}[type(method)]


def dynamic_fp8_tokens(act: Optional[Dict[str, Any]]) -> bool:
    """An input_activations scheme that is fp8 e4m3, symmetric, one scale per token, computed at
    run time: what our W8A8 fp8 path does."""
    return bool(act) and act.get("num_bits") == 8 and act.get("type") == "float" \
        and act.get("strategy") == "token" and act.get("dynamic") is True and act.get("symmetric", True)


def dynamic_int8_tokens(act: Optional[Dict[str, Any]]) -> bool:
    """An input_activations scheme that is int8, symmetric, one scale per token, computed at run
    time: what our W8A8 int8 path does (int8.py)."""
    return bool(act) and act.get("num_bits") == 8 and act.get("type", "int") == "int" \
        and act.get("strategy") == "token" and act.get("dynamic") is True and act.get("symmetric", True)


def from_config(qc: Dict[str, Any], hf_config: Any) -> QuantMethod:
    s = parse(qc)
    acts = [g.get("input_activations") for g in qc["config_groups"].values()]
    w8a8_fp8 = s.type == "float" and all(dynamic_fp8_tokens(a) for a in acts)
    w8a8_int8 = s.type == "int" and s.num_bits == 8 and all(dynamic_int8_tokens(a) for a in acts)
    if any(acts) and not (w8a8_fp8 or w8a8_int8):
        log.info("compressed-tensors checkpoint quantizes activations as %s; running it weight-only "
                 "(activations stay in the model dtype)", acts[0])
    if s.actorder not in (None, "static"):  # "group"/"weight" reorder columns through weight_g_idx
        raise UserError(f"compressed-tensors checkpoint ({s.describe()}) uses actorder={s.actorder!r}; "
                        f"supported: {SUPPORTED}")
    if s.symmetric and s.strategy in ("channel", "tensor") and s.num_bits == 8:
        if s.type == "int" and s.format in ("int-quantized", "naive-quantized"):
            return CheckpointInt8(quantize_activations=w8a8_int8)
        if s.type == "float" and s.format in ("float-quantized", "naive-quantized"):
            return CheckpointFp8(quantize_activations=w8a8_fp8)
    if s.symmetric and s.strategy in ("group", "channel") and s.num_bits == 4 and s.type == "int" \
            and s.format == "pack-quantized":
        return CheckpointInt4(s.group_size if s.strategy == "group" else None)
    raise UserError(f"compressed-tensors checkpoint ({s.describe()}) is not supported; supported: {SUPPORTED}")


# --- loaders: copy this rank's rows (and, row-parallel, columns) of a stored tensor -------------
def _rows(layer: nn.Module, loaded, shard_id):
    offset, size, start = layer.output_rows(shard_id)
    return offset, size, loaded.narrow(0, start, size)


def load_codes(layer: nn.Module, param: nn.Parameter, loaded, shard_id=None) -> None:
    """int8 / fp8 weight [out, in], stored exactly as we keep it."""
    offset, size, block = _rows(layer, loaded, shard_id)
    block = materialize(layer.input_cols(block))
    if block.dtype != param.dtype:
        raise UserError(f"compressed-tensors checkpoint: a weight is {block.dtype}, expected {param.dtype} "
                        "from its quantization_config")
    param.data.narrow(0, offset, size).copy_(block)


def load_packed_int4(layer: nn.Module, param: nn.Parameter, loaded, shard_id=None) -> None:
    """int32 words of eight codes -> our bytes of two. Little-endian, word j's bytes are exactly
    bytes 4j..4j+3 of our layout (columns 2i, 2i+1 in byte i's low, high nibble)."""
    offset, size, block = _rows(layer, loaded, shard_id)
    words = materialize(layer.input_cols(block, per=8)).contiguous()
    param.data.narrow(0, offset, size).copy_(words.view(torch.uint8))


def load_scale(layer: nn.Module, param: nn.Parameter, loaded, shard_id=None, group_size: Optional[int] = None
               ) -> None:
    """Per-tensor (one value per checkpoint tensor: q, k and v each have theirs), per-channel
    [out, 1] or per-group [out, in/group_size] scales onto our per-row storage."""
    offset, size, start = layer.output_rows(shard_id)
    dst = param.data.narrow(0, offset, size)
    if loaded.shape.numel() == 1:
        dst.fill_(materialize(loaded).reshape(()).item())
        return
    block = loaded.narrow(0, start, size)
    if group_size:  # row-parallel ranks take their groups; a channel scale spans every rank's columns
        block = layer.input_cols(block, per=group_size)
    dst.copy_(materialize(block).reshape(dst.shape))


def _register(layer: nn.Module, name: str, tensor: torch.Tensor, loader, fill_dummy) -> None:
    param = nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = partial(loader, layer)
    param.fill_dummy = fill_dummy
    layer.register_parameter(name, param)


def _no_fill(generator: torch.Generator) -> None:
    """A scale under load_format=dummy: written by its codes' fill_dummy."""


class _FromCheckpoint:
    """Mixin over our own method: same storage and matmul, but every tensor is a Parameter
    copied from the checkpoint instead of computed at load."""

    scale_group_size: Optional[int] = None

    def create_weights(self, layer: nn.Module) -> None:
        spec = self.storage(layer.out_features, layer.in_features)
        codes, scale = spec
        loader = load_packed_int4 if codes == "weight_packed" else load_codes
        (codes_shape, codes_dtype), (scale_shape, scale_dtype) = spec[codes], spec[scale]
        _register(layer, codes, torch.zeros(codes_shape, dtype=codes_dtype), loader, partial(self.fill_dummy, layer))
        _register(layer, scale, torch.zeros(scale_shape, dtype=scale_dtype),
                  partial(load_scale, group_size=self.scale_group_size), _no_fill)


class CheckpointInt8(_FromCheckpoint, Int8Method):
    name = "compressed-tensors int8"


class CheckpointFp8(_FromCheckpoint, Fp8Method):
    name = "compressed-tensors fp8"


class CheckpointInt4(_FromCheckpoint, Int4Method):
    name = "compressed-tensors int4"
    codes_name = "weight_packed"

    def __init__(self, group_size: Optional[int]):
        if sys.byteorder != "little":
            raise UserError("pack-quantized int4 checkpoints are read on little-endian hosts only")
        super().__init__(group_size)  # no tinygemm copy: create_weights registers what the checkpoint holds
        self.scale_group_size = group_size

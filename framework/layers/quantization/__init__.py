"""Weight quantization of the linear layers, chosen by `quantization.method`.

    none   full precision
    int8   symmetric per-output-channel int8, quantized at load (int8.py)
    fp8    float8_e4m3fn with per-output-channel scales, quantized at load (fp8.py); on a card
           with fp8 tensor cores, steps over 32 rows quantize activations per token too (W8A8)
    int4   group-wise symmetric 4-bit, `quantization.group_size` columns per scale (int4.py)
    auto   whatever the checkpoint's config.json `quantization_config` says (compressed-tensors,
           compressed_tensors.py); an unquantized checkpoint runs in full precision

Embeddings, lm_head and norms always stay in the model dtype, and so do activations (but for
fp8's W8A8 matmuls). A checkpoint's `ignore` list keeps the layers it names in full precision
(QuantResolver). Modules are imported only when their method is chosen.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

from framework.config.errors import UserError
from framework.config.schema import QuantizationConfig
from framework.layers.quantization.base import QuantMethod

_PKG = "framework.layers.quantization"
# quantization.method -> "module:class" of a method quantizing a full-precision checkpoint
METHODS = {"int8": f"{_PKG}.int8:Int8Method", "fp8": f"{_PKG}.fp8:Fp8Method", "int4": f"{_PKG}.int4:Int4Method"}
# quantization_config.quant_method of a pre-quantized checkpoint -> "module:function(qc, hf_config)"
CHECKPOINT_FORMATS = {"compressed-tensors": f"{_PKG}.compressed_tensors:from_config"}


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def checkpoint_quantization(hf_config: Any) -> Optional[Dict[str, Any]]:
    """config.json's quantization_config as a dict, or None for a full-precision checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None or isinstance(qc, dict):
        return qc
    return qc.to_dict()  # transformers may hand over its own config object


def checkpoint_method(qc: Dict[str, Any]) -> Tuple[str, int]:
    """(method, group_size) a pre-quantized checkpoint's weights are stored in; group 0 = per row.
    Raises a UserError for a format we cannot load (asked before any weight is read)."""
    name = qc.get("quant_method")
    if name not in CHECKPOINT_FORMATS:
        raise UserError(f"quantization.method=auto: the checkpoint's quantization {name!r} is not supported; "
                        f"supported: {', '.join(CHECKPOINT_FORMATS)} (or an unquantized checkpoint with "
                        f"quantization.method={'|'.join(METHODS)})")
    return _load(CHECKPOINT_FORMATS[name].replace(":from_config", ":stored_method"))(qc)


def resolve_quantization(cfg: QuantizationConfig, hf_config: Any, load_time_method: Optional[str] = None
                         ) -> QuantizationConfig:
    """`quantization.method` as the weights will be held: none, int8, fp8 or int4, never auto.

    auto means: `load_time_method` (what a task=save_sharded folder's manifest says it was
    quantized with at load, which config.json does not record), else the checkpoint's
    quantization_config, else none. The planner, the loader and the sharded manifest all ask
    this one function (framework/resolve.py calls it once per run)."""
    qc = checkpoint_quantization(hf_config)
    if cfg.method != "auto":
        if qc is not None:
            _already_quantized(qc, cfg.method)
        return cfg
    if load_time_method:
        return replace(cfg, method=load_time_method)
    if qc is None:
        return replace(cfg, method="none")
    return QuantizationConfig(*checkpoint_method(qc))


def _already_quantized(qc: Dict[str, Any], method: str) -> None:
    # its tensors are codes and scales: loading them as floats, or re-quantizing them, would be garbage
    raise UserError(f"the checkpoint is already quantized (quantization_config.quant_method="
                    f"{qc.get('quant_method')!r}); set quantization.method=auto to load it as it is, "
                    f"not quantization.method={method}")


@dataclass(frozen=True)
class QuantResolver:
    """The storage of each linear layer, by its checkpoint name: `method` for every layer but those
    the checkpoint's `ignore` list keeps in full precision (entries are names, or `re:` patterns
    as compressed-tensors writes them). A fused layer (qkv_proj) answers for all its parts."""

    method: Optional[QuantMethod] = None
    ignore: Tuple[str, ...] = ()

    def for_layer(self, name: str, parts: Tuple[str, ...] = ()) -> Optional[QuantMethod]:
        if self.method is None:
            return None
        names = [name] if not parts else [name.rsplit(".", 1)[0] + "." + p for p in parts]
        kept = [n for n in names if self._ignored(n)]
        if kept and len(kept) != len(names):
            raise UserError(f"the checkpoint quantizes only some parts of {name} ({', '.join(kept)} are in its "
                            "ignore list); a fused layer needs all of them quantized or none")
        return None if kept else self.method

    def _ignored(self, name: str) -> bool:
        for entry in self.ignore:
            if entry.startswith("re:") and re.fullmatch(entry[3:], name):
                return True
            if name == entry or name.endswith("." + entry):
                return True
        return False

    @classmethod
    def build(cls, resolved: QuantizationConfig, hf_config: Any, tp_size: int = 1, cuda: bool = False
              ) -> "QuantResolver":
        """From a resolved quantization config (resolve_quantization): a checkpoint's own format
        when it is stored quantized, else the method that quantizes at load. `cuda`: the model
        runs on CUDA (int4 then keeps its tinygemm copy where `int4_tinygemm` asks for it)."""
        qc = checkpoint_quantization(hf_config)
        if qc is not None and resolved.method != checkpoint_method(qc)[0]:
            _already_quantized(qc, resolved.method)
        if resolved.method == "none":
            return cls()
        if qc is not None:
            return cls(_load(CHECKPOINT_FORMATS[qc["quant_method"]])(qc, hf_config), tuple(qc.get("ignore") or ()))
        method = _load(METHODS[resolved.method])
        if resolved.method == "int4":
            return cls(method(resolved.group_size, hf_config, tp_size, tinygemm=cuda and resolved.int4_tinygemm))
        return cls(method())


def get_quant_method(cfg: QuantizationConfig, hf_config: Any) -> Optional[QuantMethod]:
    """The method of an unignored linear layer at TP=1 (tests and benchmarks of one layer)."""
    return QuantResolver.build(resolve_quantization(cfg, hf_config), hf_config).method


__all__ = ["QuantMethod", "QuantResolver", "checkpoint_quantization", "checkpoint_method", "resolve_quantization",
           "get_quant_method", "METHODS", "CHECKPOINT_FORMATS"]

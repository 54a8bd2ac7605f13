"""Weight quantization of the linear layers, chosen by `quantization.method`.

    none   full precision
    int8   symmetric per-output-channel int8, quantized at load (int8.py)
    fp8    float8_e4m3fn with per-output-channel scales, quantized at load (fp8.py)
    int4   group-wise symmetric 4-bit, `quantization.group_size` columns per scale (int4.py)
    auto   whatever the checkpoint's config.json `quantization_config` says (compressed-tensors,
           compressed_tensors.py); an unquantized checkpoint runs in full precision

Embeddings, lm_head and norms always stay in the model dtype, and so do activations. Modules
are imported only when their method is chosen.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Optional

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


def get_quant_method(cfg: QuantizationConfig, hf_config: Any) -> Optional[QuantMethod]:
    """The method every linear layer of the model uses, or None for full precision."""
    qc = checkpoint_quantization(hf_config)
    if cfg.method == "auto":
        return None if qc is None else _from_checkpoint(qc, hf_config)
    if qc is not None:  # its tensors are codes and scales: loading them as floats would be garbage
        raise UserError(f"the checkpoint is already quantized (quantization_config.quant_method="
                        f"{qc.get('quant_method')!r}); set quantization.method=auto to load it as it is, "
                        f"not quantization.method={cfg.method}")
    if cfg.method == "none":
        return None
    method = _load(METHODS[cfg.method])
    return method(cfg.group_size, hf_config) if cfg.method == "int4" else method()


def _from_checkpoint(qc: Dict[str, Any], hf_config: Any) -> QuantMethod:
    name = qc.get("quant_method")
    if name not in CHECKPOINT_FORMATS:
        raise UserError(f"quantization.method=auto: the checkpoint's quantization {name!r} is not supported; "
                        f"supported: {', '.join(CHECKPOINT_FORMATS)} (or an unquantized checkpoint with "
                        f"quantization.method={'|'.join(METHODS)})")
    return _load(CHECKPOINT_FORMATS[name])(qc, hf_config)


__all__ = ["QuantMethod", "checkpoint_quantization", "get_quant_method", "METHODS", "CHECKPOINT_FORMATS"]

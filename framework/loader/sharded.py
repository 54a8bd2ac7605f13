"""Sharded checkpoints: each tensor-parallel rank's weights exactly as it holds them, one file a rank.

`task=save_sharded` writes `rank{i}.safetensors` (already sliced, and quantized if the run
quantizes) plus `manifest.json` and a copy of the model folder's small files (config.json,
tokenizer), so the output is a model folder of its own. With `model.load_format=sharded`
each rank reads only its own file: no slicing, no re-quantizing, 1/TP of the bytes.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from framework.config.errors import UserError
from framework.loader.weights import LoadStats
from framework.parallel import ParallelInfo

MANIFEST = "manifest.json"
LOAD_TIME_METHODS = ("int8", "fp8", "int4")  # quantized by us at load: config.json has no trace of them
FORMAT = "framework-sharded/1"
# Weight files of the source folder; every other top-level file (config, tokenizer) is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass
class Manifest:
    tensor_parallel_size: int
    quantization: str  # the method the weights were saved under ("none" = plain)
    dtype: str  # of the floating-point weights as saved
    architectures: List[str]
    files: List[str] = field(default_factory=list)
    format: str = FORMAT

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise UserError(f"model.load_format=sharded: {path} does not exist; write the folder with "
                            "task=save_sharded, or use model.load_format=auto for a plain checkpoint")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise UserError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
        return cls(**data)

    @property
    def load_time_method(self) -> Optional[str]:
        """The method the weights were quantized with at load, which config.json does not record
        (layers.quantization.resolve_quantization reads it for `auto`)."""
        return self.quantization if self.quantization in LOAD_TIME_METHODS else None

    def check(self, folder: Path, tensor_parallel_size: int, quantization: str) -> None:
        """A sharded folder is only loadable at the TP size and quantization it was saved with
        (`quantization` resolved: the method the weights are held in)."""
        if tensor_parallel_size != self.tensor_parallel_size:
            raise UserError(f"parallelism.tensor_parallel_size={tensor_parallel_size}, but the sharded checkpoint "
                            f"{folder} was saved with tensor_parallel_size={self.tensor_parallel_size}; load it at "
                            f"{self.tensor_parallel_size}, or load the original model with model.load_format=auto")
        if quantization != self.quantization:
            raise UserError(f"quantization.method={quantization}, but the sharded checkpoint {folder} was saved with "
                            f"quantization.method={self.quantization}; load it with {self.quantization}")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def _derived_names(model: nn.Module) -> set:
    """Tensors a quantization method rebuilds from the others (QuantMethod.derived): not stored."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules()
            for name in getattr(getattr(module, "quant", None), "derived", ()) if hasattr(module, name)}


def held_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, each tensor once: a tied lm_head is the
    embedding, so it is stored (and later loaded) under the embedding's name only. Derived
    tensors (int4's tinygemm copy) are left out: the loading run remakes them if it keeps them."""
    seen, out = _derived_names(model), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen and name not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def save_rank(model: nn.Module, folder: Path, rank: int) -> Dict[str, object]:
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in held_tensors(model).items()}
    path = Path(folder) / rank_file(rank)
    save_file(tensors, str(path), metadata={"rank": str(rank), "format": FORMAT})
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return {"rank": rank, "file": path.name, "bytes": path.stat().st_size,
            "dtype": str(max(set(floats), key=floats.count)).replace("torch.", "") if floats else "none"}


def copy_model_files(source: Path, folder: Path) -> List[str]:
    """config.json, generation_config.json, tokenizer files...: everything but the weights."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in (
                MANIFEST, "model.safetensors.index.json"):
            shutil.copy2(path, Path(folder) / path.name)
            copied.append(path.name)
    return copied


def load_sharded(model: nn.Module, folder: Path, quantization: str, tp: ParallelInfo) -> LoadStats:
    """This rank's file into the model: names, shapes and count must match exactly."""
    start = time.perf_counter()
    Manifest.read(folder).check(folder, tp.size, quantization)
    path = Path(folder) / rank_file(tp.rank)
    if not path.is_file():
        raise UserError(f"model.load_format=sharded: {path} is missing")
    targets = held_tensors(model)
    stats = LoadStats()
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        _check_names(path, names, set(targets))
        with torch.no_grad():
            for name in sorted(names):
                tensor = f.get_tensor(name)
                target = targets[name]
                if tensor.shape != target.shape:
                    raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, this model expects "
                                    f"{tuple(target.shape)}; was it saved from a different model or settings?")
                target.copy_(tensor)
                stats.bytes_read += tensor.numel() * tensor.element_size()
                stats.num_tensors += 1
        for module in model.modules():
            quant = getattr(module, "quant", None)
            if quant is not None and quant.derived:
                quant.rebuild(module)
    stats.seconds = time.perf_counter() - start
    return stats


def _check_names(path: Path, stored: set, expected: set) -> None:
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    if missing or extra:
        raise UserError(f"{path} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}; "
                        "was it saved from a different model or quantization?")

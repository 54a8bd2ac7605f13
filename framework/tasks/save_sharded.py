"""task=save_sharded: write each rank's weights as it holds them, so later loads skip slicing.

    python -m framework.run task=save_sharded task.output_dir=/models/llama-tp2 \\
        model.path=/models/Llama-3.1-8B-Instruct parallelism.tensor_parallel_size=2
    python -m framework.run model.path=/models/llama-tp2 model.load_format=sharded \\
        parallelism.tensor_parallel_size=2

The output is a model folder: rank{i}.safetensors, manifest.json (TP size, quantization, dtype,
architecture) and a copy of config.json and the tokenizer files.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Dict, List

from framework.config.errors import UserError
from framework.config.schema import FrameworkConfig
from framework.config.validate import validate_against_model
from framework.loader.resolve import load_hf_config, resolve_model_path
from framework.loader.sharded import Manifest, copy_model_files, save_rank
from framework.memory.planner import engine_device_memory
from framework.resolve import resolve_config
from framework.tasks.metrics import write_metrics


def output_folder(cfg: FrameworkConfig) -> Path:
    if not cfg.task.output_dir:
        raise UserError("task.output_dir is not set: name the folder to write the shards to, task.output_dir=DIR")
    folder = Path(cfg.task.output_dir).expanduser()
    if folder.exists() and any(folder.iterdir()):  # never mix shards of two saves
        raise UserError(f"task.output_dir={cfg.task.output_dir!r} exists and is not empty; choose a new folder")
    return folder


def save_shards(cfg: FrameworkConfig, model_path: Path, hf_config: Any, folder: Path) -> List[Dict[str, Any]]:
    """Build every rank's model (no engine, no KV cache) and have each rank write its file."""
    from launchers import launcher_name
    if launcher_name(cfg) == "local":
        from framework.engine.model_runner import ModelRunner
        return [save_rank(ModelRunner(cfg, model_path, hf_config).model, folder, 0)]
    from launchers.ray import RayLauncher
    launcher = RayLauncher(cfg, model_path, hf_config, weights_only=True)
    try:
        return launcher.save_sharded(folder)
    finally:
        launcher.shutdown()


def checkpoint_dtype(hf_config: Any) -> str:
    """config.json's dtype (torch_dtype in older files); float32 when it names none."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def share_like_other_files(paths: List[Path]) -> None:
    """safetensors writes 0600; a shared model folder needs the mode any new file gets (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        path.chmod(0o666 & ~umask)


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    folder = output_folder(cfg)
    model_path = resolve_model_path(cfg.model.path)
    hf_config = load_hf_config(model_path)
    validate_against_model(cfg, hf_config)
    if cfg.model.dtype == "auto":  # auto means float32 on a CPU run: save the checkpoint's bytes instead
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=checkpoint_dtype(hf_config)))
    cfg = resolve_config(cfg, hf_config, engine_device_memory(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shards = save_shards(cfg, model_path, hf_config, folder)
    share_like_other_files([folder / s["file"] for s in shards])
    copy_model_files(model_path, folder)
    quantization = cfg.quantization.method  # resolved: what the weights are held as
    # Written last: a folder without a manifest (an interrupted save) never loads.
    Manifest(tensor_parallel_size=cfg.parallelism.tensor_parallel_size, quantization=quantization,
             dtype=shards[0]["dtype"], architectures=list(getattr(hf_config, "architectures", None) or []),
             files=[s["file"] for s in shards]).write(folder)
    seconds = time.perf_counter() - start
    total = sum(s["bytes"] for s in shards)
    print(f"wrote {len(shards)} shard(s), {total / 2**20:.1f} MiB, to {folder} in {seconds:.1f} s; load with "
          f"model.path={folder} model.load_format=sharded "
          f"parallelism.tensor_parallel_size={cfg.parallelism.tensor_parallel_size}"
          + (f" quantization.method={quantization}" if quantization != "none" else ""))
    write_metrics(run_dir, {"save_sharded": {"output_dir": str(folder), "seconds": round(seconds, 3),
                                             "shards": shards}})
    return 0

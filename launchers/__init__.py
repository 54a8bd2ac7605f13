"""How ranks are started: `local` (in this process, TP=1) or `ray` (one actor per rank)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.config.schema import FrameworkConfig
from launchers.base import Launcher


def launcher_name(cfg: FrameworkConfig) -> str:
    if cfg.launcher.name != "auto":
        return cfg.launcher.name
    return "local" if cfg.parallelism.tensor_parallel_size == 1 else "ray"


def start_launcher(cfg: FrameworkConfig, model_path: Path, hf_config: Any) -> "Launcher":
    """`cfg` resolved (framework/resolve.py): every rank gets the same values."""
    if launcher_name(cfg) == "local":
        from launchers.local import LocalLauncher
        return LocalLauncher(cfg, model_path, hf_config)
    from launchers.ray import RayLauncher
    return RayLauncher(cfg, model_path, hf_config)

"""How ranks are started: `local` (in this process, TP=1) or `ray` (one actor per rank)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from framework.config.schema import FrameworkConfig
from launchers.base import Launcher

if TYPE_CHECKING:
    from launchers.ray import RayLauncher


def launcher_name(cfg: FrameworkConfig) -> str:
    if cfg.launcher.name != "auto":
        return cfg.launcher.name
    return "local" if cfg.parallelism.tensor_parallel_size == 1 else "ray"


def reserve_ranks(requested: FrameworkConfig) -> Optional["RayLauncher"]:
    """For a Ray run: the ranks' resources reserved and their actors started now, from the
    config as requested, so that their processes start and import while this one checks and
    plans the config (start_launcher then builds them). None for the local launcher."""
    if launcher_name(requested) == "local":
        return None
    from framework.config.errors import ConfigError
    from launchers.ray import RayLauncher
    try:
        return RayLauncher(requested)
    except ConfigError:  # too few GPUs or CPUs: said by start_launcher, after the model's own checks
        return None


def start_launcher(cfg: FrameworkConfig, model_path: Path, hf_config: Any,
                   reserved: Optional["RayLauncher"] = None) -> "Launcher":
    """`cfg` resolved (framework/resolve.py): every rank gets the same values."""
    if reserved is not None:
        return reserved.build(cfg, model_path, hf_config)
    if launcher_name(cfg) == "local":
        from launchers.local import LocalLauncher
        return LocalLauncher(cfg, model_path, hf_config)
    from launchers.ray import RayLauncher
    return RayLauncher(cfg, model_path, hf_config)

"""TP=1 in this process: the engine and its model runner live right here."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Dict, List

import torch

from framework.config.schema import FrameworkConfig
from framework.engine.build import build_engine
from framework.engine.outputs import RequestOutput
from framework.memory.measure import rank_stats
from launchers.base import Launcher


class LocalLauncher(Launcher):
    def __init__(self, cfg: FrameworkConfig, model_path: Path, hf_config: Any):
        self.engine = build_engine(cfg, model_path, hf_config)

    def local_engine(self):
        return self.engine

    def generate(self, prompts: List[Any], params: Any, progress: bool) -> List[RequestOutput]:
        return self.engine.generate(prompts, params, progress)

    def score(self, windows: List[List[int]]) -> List[float]:
        return self.engine.score(windows)

    def stats(self) -> Dict[str, Any]:
        return {"ranks": [rank_stats(self.engine)]}

    def shutdown(self) -> None:
        """Give the device memory back now: a sweep builds the next engine in this process."""
        on_cuda = self.engine is not None and self.engine.runner.device.type == "cuda"
        self.engine = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

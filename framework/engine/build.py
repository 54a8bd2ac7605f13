"""Turns a validated config into a ready engine (rank 0) or model runner (other ranks)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional

from framework.config.schema import FrameworkConfig
from framework.engine.llm_engine import LLMEngine
from framework.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


def model_max_len(hf_config: Any) -> int:
    text = getattr(hf_config, "text_config", None) or hf_config
    limit = text.max_position_embeddings
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True):
        limit = min(limit, window)  # no sliding-window attention here: stay inside one window
    return limit


def resolve_max_model_len(cfg: FrameworkConfig, hf_config: Any) -> int:
    """An integer, null for the model's limit, or "auto" for the longest that fits (memory planner)."""
    value = cfg.cache.max_model_len
    if value is None:
        return model_max_len(hf_config)
    if value != "auto":
        return int(value)
    from framework.memory.planner import engine_device_memory, resolve_auto_limits  # the planner imports build
    return resolve_auto_limits(cfg, hf_config, engine_device_memory(cfg))[0]


def resolve_max_num_seqs(cfg: FrameworkConfig, hf_config: Any = None) -> int:
    """An integer, or for "auto" the most requests of max_model_len that fit at once, by the
    memory planner. Callers without config.json at hand may omit hf_config (read from model.path)."""
    value = cfg.cache.max_num_seqs
    if value != "auto":
        return int(value)
    from framework.memory.planner import engine_device_memory, resolve_auto_limits  # the planner imports build
    if hf_config is None:
        from framework.loader.resolve import load_hf_config, resolve_model_path
        hf_config = load_hf_config(resolve_model_path(cfg.model.path))
    return resolve_auto_limits(cfg, hf_config, engine_device_memory(cfg))[1]


def load_tokenizer(cfg: FrameworkConfig, model_path: Path) -> Optional[Any]:
    folder = Path(cfg.model.tokenizer).expanduser() if cfg.model.tokenizer else model_path
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None  # token-id prompts only
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def eos_token_ids(model_path: Path, hf_config: Any, tokenizer: Optional[Any]) -> List[int]:
    gen = model_path / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def build_runner(cfg: FrameworkConfig, model_path: Path, hf_config: Any) -> ModelRunner:
    """The "auto" limits are resolved here, once (a planner search), and kept on the runner."""
    return ModelRunner(cfg, model_path, hf_config, resolve_max_model_len(cfg, hf_config),
                       resolve_max_num_seqs(cfg, hf_config))


def build_engine(cfg: FrameworkConfig, model_path: Path, hf_config: Any, runner: Optional[ModelRunner] = None
                 ) -> LLMEngine:
    runner = runner or build_runner(cfg, model_path, hf_config)
    tokenizer = load_tokenizer(cfg, model_path)
    return LLMEngine(cfg, runner, tokenizer, runner.max_model_len, runner.max_num_seqs,
                     eos_token_ids(model_path, hf_config, tokenizer))

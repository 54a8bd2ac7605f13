"""Turns a resolved config into a ready engine: its runner, tokenizer and stop tokens."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional

from framework.config.schema import FrameworkConfig
from framework.engine.llm_engine import LLMEngine
from framework.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


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


def build_engine(cfg: FrameworkConfig, model_path: Path, hf_config: Any, runner: Optional[ModelRunner] = None
                 ) -> LLMEngine:
    """`cfg` resolved (framework/resolve.py). Rank 0's runner may be given (the Ray rank builds it first)."""
    runner = runner or ModelRunner(cfg, model_path, hf_config)
    tokenizer = load_tokenizer(cfg, model_path)
    return LLMEngine(cfg, runner, tokenizer, eos_token_ids(model_path, hf_config, tokenizer))

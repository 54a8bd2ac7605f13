"""Turns a resolved config into a ready engine: its runner, tokenizer and stop tokens."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional, Tuple

from framework.config.errors import UserError
from framework.config.schema import FrameworkConfig
from framework.engine.llm_engine import LLMEngine
from framework.engine.model_runner import ModelRunner
from framework.loader.resolve import has_tokenizer

log = logging.getLogger(__name__)


def load_tokenizer(cfg: FrameworkConfig, model_path: Path) -> Optional[Any]:
    folder = Path(cfg.model.tokenizer) if cfg.model.tokenizer else model_path  # checked in resolve_config
    if not has_tokenizer(folder):
        return None  # a model folder without one: token-id prompts only
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


def multimodal_processor(cfg: FrameworkConfig, model_path: Path, hf_config: Any, model: Any
                         ) -> Tuple[Optional[Any], int]:
    """(the model folder's processor wrapped with the limits, kwargs and input cache; the encoder
    cache budget in tokens), or (None, 0) for a text model or a text-only run."""
    if not getattr(model, "modalities", None) or not getattr(model, "vision_modules", lambda: [])():
        return None, 0
    from framework.multimodal.budget import encoder_budget_tokens
    from framework.multimodal.cache import ProcessorCache
    from framework.multimodal.processor import MultimodalProcessor
    from transformers import AutoProcessor
    mm = cfg.multimodal
    folder = str(Path(cfg.model.tokenizer).expanduser() if cfg.model.tokenizer else model_path)
    try:
        hf_processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} has no usable processor for images and videos ({str(exc).splitlines()[0][:120]}); "
                        "add the model's preprocessor files, or run it on text with multimodal=text_only") from None
    processor = MultimodalProcessor(hf_processor, mm_processor_kwargs=mm.mm_processor_kwargs,
                                    limit_mm_per_prompt=mm.limit_mm_per_prompt,
                                    language_model_only=mm.language_model_only,
                                    cache=ProcessorCache.from_gib(mm.processor_cache_gib),
                                    modalities=model.modalities)
    return processor, encoder_budget_tokens(cfg, model_path, hf_config, model.modalities)


def build_engine(cfg: FrameworkConfig, model_path: Path, hf_config: Any, runner: Optional[ModelRunner] = None
                 ) -> LLMEngine:
    """`cfg` resolved (framework/resolve.py). Rank 0's runner may be given (the Ray rank builds it first)."""
    runner = runner or ModelRunner(cfg, model_path, hf_config)
    tokenizer = load_tokenizer(cfg, model_path)
    processor, encoder_budget = multimodal_processor(cfg, model_path, hf_config, runner.model)
    return LLMEngine(cfg, runner, tokenizer, eos_token_ids(model_path, hf_config, tokenizer), processor,
                     encoder_budget)

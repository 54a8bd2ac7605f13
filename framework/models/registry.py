"""Model classes by the `architectures` entry of config.json, imported only when chosen."""
from __future__ import annotations

import importlib
from typing import Any, Dict

from framework.config.errors import UserError

# architecture -> "module:class"
MODELS = {
    "LlamaForCausalLM": "framework.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "framework.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "framework.models.llama:LlamaForCausalLM",
    "GraniteForCausalLM": "framework.models.llama:LlamaForCausalLM",
    "Qwen2_5_VLForConditionalGeneration": "framework.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "InternVLForConditionalGeneration": "framework.models.internvl:InternVLForConditionalGeneration",
    "InternVLChatModel": "framework.models.internvl_chat:InternVLChatModel",  # InternVL2's own layout
    "Gemma3ForCausalLM": "framework.models.gemma3:Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration": "framework.models.gemma3:Gemma3ForConditionalGeneration",
    "FuyuForCausalLM": "framework.models.fuyu:FuyuForCausalLM",
}
# Vision-language models whose decoder runs here but whose vision tower does not yet: they run
# with every modality limited to 0 (multimodal=text_only), as the decoder alone.
DECODER_ONLY = {"Gemma3ForConditionalGeneration"}
# Models whose attention runs the sliding window their config names (the others that name one,
# Mistral's first release, Qwen2 with use_sliding_window, run full attention: resolve.model_max_len
# keeps their context inside one window, where both agree).
RUNS_SLIDING_WINDOW = {"Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"}


def architecture(hf_config: Any) -> str:
    """The first of config.json's `architectures` that we run."""
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODELS:
            return arch
    named = getattr(hf_config, "architectures", None) or f"model_type {getattr(hf_config, 'model_type', None)!r}"
    raise UserError(f"model architecture {named} is not supported; supported: {', '.join(MODELS)}")


def check_runnable(hf_config: Any, limit_mm_per_prompt: Dict[str, Any]) -> None:
    """What the engine can run today (the planner plans the rest too)."""
    arch = architecture(hf_config)
    text_only = bool(limit_mm_per_prompt) and all(_count(v) == 0 for v in limit_mm_per_prompt.values())
    if arch in DECODER_ONLY and not text_only:
        raise UserError(f"{arch}: images and videos are not supported yet, only its decoder; set "
                        "multimodal.limit_mm_per_prompt to 0 for every modality (multimodal=text_only) "
                        "to run it on text")


def _count(limit: Any) -> int:
    return int(limit.get("count", 1)) if isinstance(limit, dict) else int(limit)


def model_class(hf_config: Any) -> type:
    module, cls = MODELS[architecture(hf_config)].split(":")
    return getattr(importlib.import_module(module), cls)

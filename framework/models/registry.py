"""Model classes by the `architectures` entry of config.json, imported only when chosen."""
from __future__ import annotations

import importlib
from typing import Any

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
    "Gemma3ForConditionalGeneration": "framework.models.gemma3_vision:Gemma3ForConditionalGeneration",
    "FuyuForCausalLM": "framework.models.fuyu:FuyuForCausalLM",
}
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


def model_class(hf_config: Any) -> type:
    module, cls = MODELS[architecture(hf_config)].split(":")
    return getattr(importlib.import_module(module), cls)

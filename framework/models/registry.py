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
}


def model_class(hf_config: Any) -> type:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODELS:
            module, cls = MODELS[arch].split(":")
            return getattr(importlib.import_module(module), cls)
    raise UserError(f"model architecture {getattr(hf_config, 'architectures', None)} is not supported; "
                    f"supported: {', '.join(MODELS)}")

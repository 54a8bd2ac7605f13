"""A YAML-first LLM deployment framework: one config, our own inference core."""
# Before anything imports transformers: a torchvision whose compiled operators cannot load
# (the CUDA wheel beside a CPU torch) would otherwise break every transformers import.
from framework.multimodal.torchvision_compat import prepare_torchvision

prepare_torchvision()

from framework.config.schema import FrameworkConfig
from framework.engine.outputs import CompletionOutput, RequestOutput
from framework.engine.sampling_params import SamplingParams


def compose(overrides=()):
    """Compose conf/ + overrides (Hydra syntax) into a validated FrameworkConfig."""
    from framework.config.compose import compose as _compose
    return _compose(overrides)


def __getattr__(name):  # LLM pulls in torch models and launchers: import it on first use
    if name == "LLM":
        from framework.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "CompletionOutput", "FrameworkConfig", "RequestOutput", "SamplingParams", "compose"]

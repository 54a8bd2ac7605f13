from framework.config.errors import ConfigError, UserError
from framework.config.schema import (CacheConfig, CompilationLevel, FrameworkConfig, LauncherConfig, ModelConfig,
                                     MultimodalConfig, ParallelConfig, QuantizationConfig, TaskConfig)
from framework.config.validate import validate, validate_against_model
# vLLM's CompilationConfig (level or mode, capture sizes, cudagraph_mode): a subclass of the
# schema's, so `compilation=CompilationConfig(...)` fits a FrameworkConfig and vLLM's scripts alike.
from framework.config.vllm_args import CompilationConfig, CompilationMode

__all__ = ["CacheConfig", "CompilationConfig", "CompilationLevel", "CompilationMode", "ConfigError",
           "FrameworkConfig", "LauncherConfig", "ModelConfig", "MultimodalConfig", "ParallelConfig",
           "QuantizationConfig", "TaskConfig", "UserError", "validate", "validate_against_model"]

from framework.config.errors import ConfigError, UserError
from framework.config.schema import (CacheConfig, CompilationConfig, CompilationLevel, FrameworkConfig,
                                     LauncherConfig, ModelConfig, MultimodalConfig, ParallelConfig,
                                     QuantizationConfig, TaskConfig)
from framework.config.validate import validate, validate_against_model

__all__ = ["CacheConfig", "CompilationConfig", "CompilationLevel", "ConfigError", "FrameworkConfig",
           "LauncherConfig", "ModelConfig", "MultimodalConfig", "ParallelConfig", "QuantizationConfig",
           "TaskConfig", "UserError", "validate", "validate_against_model"]

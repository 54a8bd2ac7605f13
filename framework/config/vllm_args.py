"""vLLM's constructor, `LLM(model=..., tensor_parallel_size=2, ...)`, onto our FrameworkConfig.

A vLLM script switches by changing its import: every keyword of vLLM's `LLM(...)` (engine
arguments) that this framework has a knob for lands on that knob's YAML key (the table below
is the whole mapping), a few are accepted with nothing to do, and any other keyword is one
error naming it. vLLM's environment variables for cache sizes are read here as vLLM reads them,
so the library path sees the same values as `python -m framework.run` (conf/ reads them through
`${oc.env:...}`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Dict, List, Optional, Union

from framework.config import schema
from framework.config.errors import ConfigError
from framework.config.schema import CompilationLevel, FrameworkConfig
from framework.config.validate import validate

log = logging.getLogger(__name__)

# vLLM keyword -> our YAML key (group.key). Values go through as given (vLLM's spellings of a few
# choices translated, below); validate() judges them and the error names the keyword.
KEYS: Dict[str, str] = {
    "model": "model.path",
    "tokenizer": "model.tokenizer",
    "dtype": "model.dtype",
    "load_format": "model.load_format",
    "seed": "model.seed",
    "device": "model.device",
    "tensor_parallel_size": "parallelism.tensor_parallel_size",
    "quantization": "quantization.method",
    "max_model_len": "cache.max_model_len",
    "max_num_seqs": "cache.max_num_seqs",
    "max_num_batched_tokens": "cache.max_num_batched_tokens",
    "gpu_memory_utilization": "cache.gpu_memory_utilization",
    "block_size": "cache.block_size",
    "kv_cache_dtype": "cache.kv_cache_dtype",
    "enable_prefix_caching": "cache.enable_prefix_caching",
    "num_gpu_blocks_override": "cache.num_gpu_blocks_override",
    "async_scheduling": "cache.async_scheduling",
    "enforce_eager": "compilation.enforce_eager",
    "limit_mm_per_prompt": "multimodal.limit_mm_per_prompt",
    "mm_processor_kwargs": "multimodal.mm_processor_kwargs",
    "mm_processor_cache_gb": "multimodal.mm_input_cache_gib",  # vLLM's newer name for VLLM_MM_INPUT_CACHE_GIB
}

# Keywords that need a translation, not a copy (handled in `_apply`).
TRANSLATED = ("compilation_config", "distributed_executor_backend", "trust_remote_code", "language_model_only",
              "kv_cache_memory_bytes", "disable_custom_all_reduce")

# vLLM's names for our choices where they differ. vLLM's quantization=None reads the checkpoint's
# quantization_config, which is our `auto`; so does a config built here from scratch.
QUANTIZATION_ALIASES = {"compressed-tensors": "auto"}
LOAD_FORMAT_ALIASES = {"sharded_state": "sharded"}
DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}  # our fp8 KV cache is e4m3
EXECUTOR_BACKENDS = {None: "auto", "ray": "ray", "uni": "local"}
# Types that validate() takes for granted (the CLI's are checked by the schema).
BOOLS = ("enforce_eager", "enable_prefix_caching", "async_scheduling", "trust_remote_code", "language_model_only",
         "disable_custom_all_reduce")
NUMBERS = ("gpu_memory_utilization", "mm_processor_cache_gb", "kv_cache_memory_bytes")

# vLLM's environment variables, as vLLM reads them (GiB), and the key each one sets.
ENV_KEYS = {"VLLM_CPU_KVCACHE_SPACE": "cache.cpu_kvcache_space_gib",
            "VLLM_MM_INPUT_CACHE_GIB": "multimodal.mm_input_cache_gib"}


class CompilationMode(IntEnum):
    """vLLM's newer name for the compilation level (`CompilationConfig(mode=...)`); same numbers."""

    NONE = 0
    STOCK_TORCH_COMPILE = 1
    DYNAMO_TRACE_ONCE = 2
    VLLM_COMPILE = 3


# vLLM's cudagraph_mode values and whether they leave decode graphs on. We capture whole decode
# steps (vLLM's FULL_DECODE_ONLY); vLLM's default FULL_AND_PIECEWISE means "graphs on" here too.
CUDAGRAPH_MODES = {"NONE": False, "FULL_DECODE_ONLY": True, "FULL_AND_PIECEWISE": True}


@dataclass
class CompilationConfig(schema.CompilationConfig):
    """vLLM's `CompilationConfig` as scripts write it. `level` (CompilationLevel or its number) or
    `mode` (CompilationMode), `cudagraph_capture_sizes`, `max_cudagraph_capture_size` (the default
    sizes up to it) and `cudagraph_mode` (NONE = no graphs) all land on the three fields of
    our schema's CompilationConfig when the object is built, so it is one wherever one is taken."""

    mode: Optional[int] = None
    cudagraph_mode: Optional[str] = None
    max_cudagraph_capture_size: Optional[int] = None

    def __post_init__(self) -> None:
        self.level = _level("compilation_config.level", self.level)
        if self.mode is not None:
            self.level = _level("compilation_config.mode", self.mode, CompilationMode)
        if self.cudagraph_mode is not None:
            name = str(getattr(self.cudagraph_mode, "name", self.cudagraph_mode)).upper()
            if name not in CUDAGRAPH_MODES:
                raise ConfigError("compilation_config.cudagraph_mode", self.cudagraph_mode,
                                  f"must be one of {', '.join(CUDAGRAPH_MODES)} (this engine captures whole "
                                  "decode steps; it has no piecewise-only graphs)")
            self.enforce_eager = self.enforce_eager or not CUDAGRAPH_MODES[name]
        if self.max_cudagraph_capture_size is not None:
            top = self.max_cudagraph_capture_size
            if isinstance(top, bool) or not isinstance(top, int) or top <= 0:
                raise ConfigError("compilation_config.max_cudagraph_capture_size", top, "must be a positive integer")
            sizes = self.cudagraph_capture_sizes or default_capture_sizes(top)
            self.cudagraph_capture_sizes = [s for s in sizes if s <= top]

    def to_schema(self) -> schema.CompilationConfig:
        return schema.CompilationConfig(level=self.level, cudagraph_capture_sizes=self.cudagraph_capture_sizes,
                                        enforce_eager=self.enforce_eager)


def default_capture_sizes(top: int) -> List[int]:
    """vLLM's default list (1, 2, 4, then steps of 8) up to `top`."""
    return [s for s in [1, 2, 4] + list(range(8, top + 8, 8)) if s <= top]


def _level(key: str, value: Any, names: type = CompilationLevel) -> CompilationLevel:
    """A level or mode given as the enum, its number or its name -> our CompilationLevel."""
    try:
        number = names[value.upper()] if isinstance(value, str) else int(value)
        return CompilationLevel(int(number))
    except (KeyError, ValueError, TypeError):
        valid = ", ".join(f"{m.name} ({m.value})" for m in names)
        raise ConfigError(key, value, f"must be one of {valid}") from None


def compilation(value: Any) -> schema.CompilationConfig:
    """compilation_config as vLLM takes it: a CompilationConfig, a dict of its fields, or a level."""
    if isinstance(value, CompilationConfig):
        return value.to_schema()
    if isinstance(value, schema.CompilationConfig):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        fields = {f.name for f in dataclasses.fields(CompilationConfig)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ConfigError(f"compilation_config.{unknown[0]}", value[unknown[0]],
                              f"not a field this framework has; valid fields: {', '.join(sorted(fields))}")
        return CompilationConfig(**value).to_schema()
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return CompilationConfig(level=value).to_schema()
    raise ConfigError("compilation_config", value, "must be a CompilationConfig, a dict of its fields or a level (0-3)")


def env_overrides(cfg: FrameworkConfig, environ: Optional[Dict[str, str]] = None) -> FrameworkConfig:
    """VLLM_CPU_KVCACHE_SPACE and VLLM_MM_INPUT_CACHE_GIB onto their keys, as conf/ reads them."""
    environ = os.environ if environ is None else environ
    for var, key in ENV_KEYS.items():
        if environ.get(var, "").strip():
            try:
                _set(cfg, key, float(environ[var]))
            except ValueError:
                raise ConfigError(var, environ[var], f"must be a number of GiB (it sets {key})") from None
    return cfg


def _set(cfg: FrameworkConfig, key: str, value: Any) -> None:
    group, name = key.split(".")
    setattr(getattr(cfg, group), name, value)


def _apply(cfg: FrameworkConfig, keyword: str, value: Any) -> None:
    if keyword in BOOLS and not isinstance(value, bool):
        raise ConfigError(keyword, value, "must be True or False")
    if keyword in NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(keyword, value, "must be a number")
    if keyword == "compilation_config":
        enforce_eager = cfg.compilation.enforce_eager  # enforce_eager=True wins whichever comes first
        cfg.compilation = compilation(value)
        cfg.compilation.enforce_eager = cfg.compilation.enforce_eager or enforce_eager
    elif keyword == "distributed_executor_backend":
        if value not in EXECUTOR_BACKENDS:
            raise ConfigError("distributed_executor_backend", value,
                              "must be None, 'ray' or 'uni' (in process, TP=1); this framework has no 'mp' backend")
        cfg.launcher.name = EXECUTOR_BACKENDS[value]
    elif keyword == "trust_remote_code":
        if value:  # our own model code runs, never a checkpoint's: there is nothing to trust
            log.info("trust_remote_code=True: nothing to do; this framework runs its own model code, never a "
                     "checkpoint's")
    elif keyword == "language_model_only":
        if value:  # vLLM's text-only switch: every modality at 0, as limit_mm_per_prompt={image: 0, ...}
            cfg.multimodal.limit_mm_per_prompt = {m: 0 for m in ("image", "video", "audio")}
    elif keyword == "quantization":
        cfg.quantization.method = QUANTIZATION_ALIASES.get(value, value)
    elif keyword == "dtype":
        value = str(value).replace("torch.", "")  # vLLM also takes a torch.dtype
        cfg.model.dtype = DTYPE_ALIASES.get(value, value)
    elif keyword == "load_format":
        cfg.model.load_format = LOAD_FORMAT_ALIASES.get(value, value)
    elif keyword == "disable_custom_all_reduce":
        cfg.parallelism.custom_all_reduce = not value
    elif keyword == "kv_cache_memory_bytes":  # vLLM counts bytes, our key GiB
        if value <= 0:
            raise ConfigError(keyword, value, "must be a number of bytes > 0")
        cfg.cache.kv_cache_memory_gib = value / (1 << 30)
    elif keyword == "tokenizer":
        cfg.model.tokenizer = tokenizer_folder(value)
    elif keyword == "kv_cache_dtype":
        cfg.cache.kv_cache_dtype = KV_CACHE_DTYPE_ALIASES.get(value, value)
    elif keyword in ("limit_mm_per_prompt", "mm_processor_kwargs"):
        _set(cfg, KEYS[keyword], _mm_dict(keyword, value))
    else:
        _set(cfg, KEYS[keyword], value)


def _mm_dict(keyword: str, value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(keyword, value, "must be a dict, e.g. {'image': 3, 'video': 1}")
    if keyword == "limit_mm_per_prompt":  # vLLM's long form {image: {count: 3, width: ...}}: the count limits
        return {m: (v.get("count", 1) if isinstance(v, dict) else v) for m, v in value.items()}
    return dict(value)


def tokenizer_folder(value: Any) -> str:
    """A tokenizer folder, or a hub id resolved from the local HF cache (never downloaded)."""
    from framework.loader.resolve import resolve_tokenizer_path
    return str(resolve_tokenizer_path(os.fspath(value), key="tokenizer"))


# vLLM's memory keywords with no knob here, and what to reach for instead (said in the error).
MEMORY_ALTERNATIVES = {
    "cpu_offload_gb": "weights are never offloaded to host memory here; to fit them use quantization=fp8 or "
                      "int4, or tensor_parallel_size=N (task=plan lists the overrides that fit)",
    "swap_space": "a preempted request is recomputed here, never swapped to host memory: nothing to size",
    "kv_offloading_size": "there is no host tier for the KV cache here; kv_cache_dtype='fp8' halves its bytes",
    "enable_sleep_mode": "there is no sleep mode here; shut the LLM down (`with LLM(...)` or .shutdown()) to "
                         "free its GPU memory",
}


def unknown_keyword(keyword: str, value: Any) -> ConfigError:
    if keyword in MEMORY_ALTERNATIVES:
        return ConfigError(keyword, value, f"not supported: {MEMORY_ALTERNATIVES[keyword]}")
    known = sorted([*KEYS, *TRANSLATED])
    close = difflib.get_close_matches(keyword, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(keyword, value, f"not a keyword this framework has a knob for; {hint}"
                       f"accepted: {', '.join(known)}")


def _as_vllm_error(exc: ConfigError, given: Dict[str, Any]) -> ConfigError:
    """validate() names our YAML key; name the keyword the script passed, with the key beside it."""
    for keyword, key in KEYS.items():
        if key == exc.key and keyword in given:
            return ConfigError(keyword, given[keyword], f"{exc.expected} (YAML key {key}={exc.value!r})")
    return exc


def to_config(model: Union[None, str, FrameworkConfig] = None, **kwargs: Any) -> FrameworkConfig:
    """`LLM()`, `LLM("path or org/name")`, `LLM(model=..., **vllm_kwargs)` or `LLM(config, **vllm_kwargs)`
    -> a validated FrameworkConfig. A config given is copied, never changed. Built from scratch it
    reads vLLM's environment variables and, like vLLM, takes the checkpoint's own quantization
    (quantization.method=auto). A keyword given as None keeps the default, as in vLLM."""
    if "model" in kwargs and model is not None:
        raise ConfigError("model", kwargs["model"], f"given twice (also as the first argument {model!r})")
    model = kwargs.pop("model", model)
    if isinstance(model, FrameworkConfig):
        cfg = copy.deepcopy(model) if kwargs else model
    elif model is None or isinstance(model, (str, os.PathLike)):
        cfg = env_overrides(FrameworkConfig())
        cfg.quantization.method = "auto"
        if model is not None:
            cfg.model.path = os.fspath(model)
    else:
        raise ConfigError("model", model, "must be a model folder or hub id (str) or a FrameworkConfig")
    for keyword, value in kwargs.items():
        if keyword not in KEYS and keyword not in TRANSLATED:
            raise unknown_keyword(keyword, value)
        if value is not None:
            _apply(cfg, keyword, value)
    try:
        return validate(cfg)
    except ConfigError as exc:
        raise _as_vllm_error(exc, kwargs) from None

"""Semantic checks that types alone cannot express, run before any weight is read.

`validate` needs only the config; `validate_against_model` also needs the model's config.json
(head counts, context limit). Both raise ConfigError with one line naming the key.
"""
from __future__ import annotations

from typing import Any, Iterable

from framework.config.errors import ConfigError
from framework.config.schema import FrameworkConfig
from framework.multimodal.limits import parse_limits

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy", "sharded")
DEVICES = ("auto", "cpu", "cuda")
QUANT_METHODS = ("none", "fp8", "int8", "int4", "auto")
KV_CACHE_DTYPES = ("auto", "fp8")
LAUNCHERS = ("auto", "local", "ray")
TASKS = ("generate", "chat", "bench", "plan", "eval", "serve", "save_sharded")


def _choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(choices)}")


def _positive(key: str, value: Any, allow: tuple = ()) -> None:
    if value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        extra = "".join(f" or {a!r}" if a is not None else " or null" for a in allow)
        raise ConfigError(key, value, f"must be a positive integer{extra}")


def validate(cfg: FrameworkConfig) -> FrameworkConfig:
    m, c, comp, mm, t = cfg.model, cfg.cache, cfg.compilation, cfg.multimodal, cfg.task
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.load_format", m.load_format, LOAD_FORMATS)
    _choice("model.device", m.device, DEVICES)
    _positive("parallelism.tensor_parallel_size", cfg.parallelism.tensor_parallel_size)
    _choice("quantization.method", cfg.quantization.method, QUANT_METHODS)
    _positive("quantization.group_size", cfg.quantization.group_size)

    _positive("cache.block_size", c.block_size)
    if c.block_size & (c.block_size - 1) or c.block_size > 256:
        raise ConfigError("cache.block_size", c.block_size, "must be a power of two up to 256")
    _positive("cache.max_model_len", c.max_model_len, allow=(None, "auto"))
    _positive("cache.max_num_seqs", c.max_num_seqs, allow=("auto",))
    _positive("cache.max_num_batched_tokens", c.max_num_batched_tokens)
    if not 0 < c.gpu_memory_utilization <= 1:
        raise ConfigError("cache.gpu_memory_utilization", c.gpu_memory_utilization, "must be in (0, 1]")
    _choice("cache.kv_cache_dtype", c.kv_cache_dtype, KV_CACHE_DTYPES)
    if not c.cpu_kvcache_space_gib > 0:
        raise ConfigError("cache.cpu_kvcache_space_gib", c.cpu_kvcache_space_gib, "must be > 0 GiB")
    _positive("cache.num_gpu_blocks_override", c.num_gpu_blocks_override, allow=(None,))

    sizes = comp.cudagraph_capture_sizes
    if sizes is not None:
        if not sizes or any(s <= 0 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ConfigError("compilation.cudagraph_capture_sizes", list(sizes),
                              "must be a non-empty, strictly increasing list of positive integers")

    parse_limits(mm.limit_mm_per_prompt)  # both forms; raises ConfigError naming the key
    for key in ("mm_input_cache_gib", "mm_processor_cache_gib"):
        value = getattr(mm, key)
        if value is not None and not value >= 0:
            raise ConfigError(f"multimodal.{key}", value, "must be >= 0 GiB (0 disables the cache)")

    _choice("launcher.name", cfg.launcher.name, LAUNCHERS)
    if cfg.launcher.name == "local" and cfg.parallelism.tensor_parallel_size > 1:
        raise ConfigError("launcher.name", "local", "runs one rank only; use launcher=ray (or auto) for "
                          f"tensor_parallel_size={cfg.parallelism.tensor_parallel_size}")

    _choice("task.name", t.name, TASKS)
    _positive("task.max_tokens", t.max_tokens)
    if t.temperature < 0:
        raise ConfigError("task.temperature", t.temperature, "must be >= 0 (0 = greedy)")
    if not 0 < t.top_p <= 1:
        raise ConfigError("task.top_p", t.top_p, "must be in (0, 1]")
    if t.top_k == 0 or t.top_k < -1:
        raise ConfigError("task.top_k", t.top_k, "must be -1 (off) or a positive integer")
    _positive("task.num_requests", t.num_requests)
    if not 0 <= t.port <= 65535:
        raise ConfigError("task.port", t.port, "must be in [0, 65535] (0 picks a free port)")
    _positive("task.compare_hf_requests", t.compare_hf_requests, allow=(None,))
    if isinstance(t.decode_batch1_tokens, bool) or not isinstance(t.decode_batch1_tokens, int) \
            or t.decode_batch1_tokens < 0:
        raise ConfigError("task.decode_batch1_tokens", t.decode_batch1_tokens, "must be an integer >= 0 (0 skips it)")
    for key in ("input_len_range", "output_len_range"):
        lo_hi = list(getattr(t, key))
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"task.{key}", lo_hi, "must be [low, high] with 0 < low <= high")
    return cfg


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate_against_model(cfg: FrameworkConfig, hf_config: Any) -> None:
    """Checks that need config.json: a supported architecture, head divisibility for TP and the
    context limit."""
    from framework.models.registry import architecture  # imports no model module
    architecture(hf_config)  # an unsupported one is named, with the supported ones
    tp = cfg.parallelism.tensor_parallel_size
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ConfigError("parallelism.tensor_parallel_size", tp,
                          f"must divide the model's num_attention_heads={heads}; valid: {_divisors(heads)}")
    if (kv_heads % tp) if kv_heads >= tp else (tp % kv_heads):
        raise ConfigError("parallelism.tensor_parallel_size", tp,
                          f"must divide num_key_value_heads={kv_heads} or be a multiple of it")
    limit = getattr(text, "max_position_embeddings", None)
    max_len = cfg.cache.max_model_len
    if isinstance(max_len, int) and limit and max_len > limit and not cfg.cache.allow_long_max_model_len:
        raise ConfigError("cache.max_model_len", max_len,
                          f"exceeds the model's max_position_embeddings={limit}; lower it or set "
                          "cache.allow_long_max_model_len=true")

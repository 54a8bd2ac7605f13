"""Semantic checks that types alone cannot express, run before any weight is read.

`validate` needs only the config; `validate_against_model` also needs the model's config.json
(head counts, context limit). Both raise ConfigError with one line naming the key.
`check_before_start` is the library's front door: those checks, the device, and a note for each
knob that does nothing in the run at hand (a sharded folder's manifest is checked where
`quantization.method=auto` is resolved, framework/resolve.py, still before any plan or rank).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Sequence, Tuple

from framework.config.errors import ConfigError, UserError
from framework.config.schema import FrameworkConfig
from framework.multimodal.limits import parse_limits

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy", "sharded")
DEVICES = ("auto", "cpu", "cuda")
QUANT_METHODS = ("none", "fp8", "int8", "int4", "auto")
KV_CACHE_DTYPES = ("auto", "fp8")
LAUNCHERS = ("auto", "local", "ray")
TASKS = ("generate", "chat", "bench", "plan", "eval", "serve", "save_sharded")
HF_APIS = ("generate", "generate_batch")

log = logging.getLogger(__name__)


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
    if m.device == "cuda:0":  # the first visible GPU: what `cuda` means here
        m.device = "cuda"
    if isinstance(m.device, str) and re.fullmatch(r"cuda:\d+", m.device):
        index = m.device.split(":")[1]
        raise ConfigError("model.device", m.device, f"pick the GPU with CUDA_VISIBLE_DEVICES={index} and "
                          "model.device=cuda (each rank uses the first GPU it sees)")
    _choice("model.device", m.device, DEVICES)
    _positive("parallelism.tensor_parallel_size", cfg.parallelism.tensor_parallel_size)
    _choice("quantization.method", cfg.quantization.method, QUANT_METHODS)
    _positive("quantization.group_size", cfg.quantization.group_size)
    for method in t.quantizations:
        _choice("task.quantizations", method, QUANT_METHODS)

    _positive("cache.block_size", c.block_size)
    if c.block_size & (c.block_size - 1) or c.block_size > 256:
        raise ConfigError("cache.block_size", c.block_size, "must be a power of two up to 256")
    _positive("cache.max_model_len", c.max_model_len, allow=(None, "auto"))
    _positive("cache.max_num_seqs", c.max_num_seqs, allow=("auto",))
    _positive("cache.max_num_batched_tokens", c.max_num_batched_tokens, allow=(None,))
    if not 0 < c.gpu_memory_utilization <= 1:
        raise ConfigError("cache.gpu_memory_utilization", c.gpu_memory_utilization, "must be in (0, 1]")
    _choice("cache.kv_cache_dtype", c.kv_cache_dtype, KV_CACHE_DTYPES)
    if not c.cpu_kvcache_space_gib > 0:
        raise ConfigError("cache.cpu_kvcache_space_gib", c.cpu_kvcache_space_gib, "must be > 0 GiB")
    _positive("cache.num_gpu_blocks_override", c.num_gpu_blocks_override, allow=(None,))
    if c.kv_cache_memory_gib is not None and not c.kv_cache_memory_gib > 0:
        raise ConfigError("cache.kv_cache_memory_gib", c.kv_cache_memory_gib, "must be > 0 GiB (or null)")

    sizes = comp.cudagraph_capture_sizes
    if sizes is not None:
        if not sizes or any(s <= 0 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ConfigError("compilation.cudagraph_capture_sizes", list(sizes),
                              "must be a non-empty, strictly increasing list of positive integers")

    workers = comp.compile_workers
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError("compilation.compile_workers", workers, "must be an integer >= 0 (0: no worker "
                          "processes) or null (one per CPU, at most 16)")

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
    _positive("task.runs", t.runs)
    if not 0 <= t.port <= 65535:
        raise ConfigError("task.port", t.port, "must be in [0, 65535] (0 picks a free port)")
    if t.api_key is not None and (not isinstance(t.api_key, str) or not t.api_key.strip()):
        raise ConfigError("task.api_key", t.api_key, "must be a non-empty string, or null for no key")
    if not all(isinstance(o, str) and o for o in t.cors_origins):
        raise ConfigError("task.cors_origins", list(t.cors_origins), "must be a list of origins like "
                          "http://localhost:3000, or [\"*\"]")
    _positive("task.max_body_bytes", t.max_body_bytes)
    if not isinstance(t.frontend_process, bool):
        raise ConfigError("task.frontend_process", t.frontend_process, "must be true or false")
    if isinstance(t.drain_s, bool) or not isinstance(t.drain_s, (int, float)) or not 0 <= t.drain_s < float("inf"):
        raise ConfigError("task.drain_s", t.drain_s, "must be a number of seconds >= 0")
    _positive("task.compare_hf_requests", t.compare_hf_requests, allow=(None,))
    _choice("task.compare_hf_api", t.compare_hf_api, HF_APIS)
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
    _check_bidirectional_runs(cfg, hf_config)


def _check_bidirectional_runs(cfg: FrameworkConfig, hf_config: Any) -> None:
    """A model whose image tokens attend both ways (Gemma-3) computes each image in one prefill
    chunk: max_num_batched_tokens must hold one, unless images are off."""
    if getattr(hf_config, "vision_config", None) is None:
        return
    from framework.models.registry import model_class
    from framework.multimodal.limits import parse_limits, text_only
    cls = model_class(hf_config)
    run = getattr(cls, "bidirectional_run_tokens", lambda c: 0)(hf_config)
    mm = cfg.multimodal
    if not run or text_only(parse_limits(mm.limit_mm_per_prompt, mm.language_model_only, cls.modalities)):
        return
    # null resolves by the device, to at least BATCHED_TOKENS_DEFAULT (2048); a run larger than what it
    # resolves to fails its own request (the encoder budget check), so only a number is checked here
    if cfg.cache.max_num_batched_tokens is not None and cfg.cache.max_num_batched_tokens < run:
        raise ConfigError("cache.max_num_batched_tokens", cfg.cache.max_num_batched_tokens,
                          f"must be >= {run}: an image's {run} tokens attend to each other both ways and are "
                          "computed in one prefill chunk (or run on text with multimodal=text_only)")


def _tinygemm_notes(cfg: FrameworkConfig, hf_config: Any, on_gpu: bool) -> List[Tuple[int, str]]:
    """quantization.int4_tinygemm=true acts only where int4 quantizes at load on CUDA, as the method
    resolves (`auto`: the checkpoint's own; a checkpoint stored in int4 keeps no tinygemm copy), and
    pays only at group sizes below 128."""
    from framework.layers.quantization import resolve_quantization
    from framework.resolve import load_time_method

    q = cfg.quantization
    resolved = resolve_quantization(q, hf_config, load_time_method(cfg))
    key = "quantization.int4_tinygemm=true"
    if not on_gpu or resolved.method != "int4":
        why = "on the CPU backend" if not on_gpu else f"with quantization.method={q.method}" + (
            f" (resolved to {resolved.method} for this checkpoint)" if q.method != resolved.method else "")
        return [(logging.WARNING, f"{key}: not used {why} (int4 on CUDA in bf16 only)")]
    if not resolved.int4_tinygemm:
        return [(logging.WARNING, f"{key}: not used: the checkpoint is stored in int4 and loads as stored, with "
                 "no tinygemm copy")]
    if resolved.group_size % 128 == 0:
        return [(logging.WARNING, f"{key}: decode steps of 2-4 tokens take tinygemm, slower than the default int4 "
                 f"path at group_size={resolved.group_size} (kernels/int4_mma_gemv.py; tinygemm pays off for group "
                 "sizes 32 and 64); its copy costs another 1/2 byte a weight")]
    return []


def validate_device_present(cfg: FrameworkConfig) -> None:
    """model.device=cuda needs a GPU in this process, unless the ranks run on a Ray cluster
    named by launcher.address (a CPU-only driver of GPU nodes) or task=plan plans for a GPU
    of task.device_memory_gib."""
    planning_for_a_size = cfg.task.name == "plan" and cfg.task.device_memory_gib
    if cfg.model.device != "cuda" or cfg.launcher.address or planning_for_a_size:
        return
    import torch
    if torch.cuda.is_available():
        return
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
    raise ConfigError("model.device", cfg.model.device, f"{why} (torch {torch.__version__}); use model.device=auto "
                      "or cpu, plan for a GPU with task=plan task.device_memory_gib=N, or name a GPU cluster with "
                      "launcher=ray launcher.address=HOST:PORT")


def inert_knobs(cfg: FrameworkConfig, hf_config: Any, on_gpu: bool, multimodal: bool,
                modalities: Sequence[str] = ()) -> List[Tuple[int, str]]:
    """Knobs that this run cannot act on, each as (log level, one line to say at start): a warning
    where the value was chosen, info where it is the default (CUDA graphs on a CPU run).
    `modalities`: those the model takes (a limit for another one does nothing)."""
    notes = []
    comp, mm = cfg.compilation, cfg.multimodal
    if not on_gpu:
        graphs = "" if comp.enforce_eager else "CUDA graphs (compilation=cudagraph, the default)"
        compiled = f"compilation.level={getattr(comp.level, 'name', comp.level)}" if comp.level else ""
        sizes = f"compilation.cudagraph_capture_sizes={list(comp.cudagraph_capture_sizes)}" \
            if comp.cudagraph_capture_sizes and not comp.enforce_eager else ""
        what = ", ".join(x for x in (compiled, sizes or graphs) if x)
        if what:
            level = logging.WARNING if compiled or sizes else logging.INFO
            notes.append((level, f"{what}: not used on the CPU backend (GPU only); this run decodes eagerly"))
        if comp.compile_workers:
            notes.append((logging.WARNING, f"compilation.compile_workers={comp.compile_workers}: not used on the "
                          "CPU backend (its kernels are not compiled by Triton)"))
        if not comp.programmatic_dependent_launch:
            notes.append((logging.INFO, "compilation.programmatic_dependent_launch=false: nothing to switch off on "
                          "the CPU backend (GPU kernels only)"))
    notes += _kv_size_notes(cfg.cache, on_gpu)
    if cfg.quantization.int4_tinygemm:
        notes += _tinygemm_notes(cfg, hf_config, on_gpu)
    if not cfg.parallelism.custom_all_reduce and (not on_gpu or cfg.parallelism.tensor_parallel_size == 1):
        why = "on the CPU backend" if not on_gpu else "at tensor_parallel_size=1"
        notes.append((logging.INFO, f"parallelism.custom_all_reduce=false: nothing to switch off {why} "
                      "(it picks the all-reduce of GPU ranks)"))
    if not multimodal:
        arch = ", ".join(getattr(hf_config, "architectures", None) or []) or "this model"
        for key in ("limit_mm_per_prompt", "mm_processor_kwargs"):
            if getattr(mm, key):
                notes.append((logging.WARNING, f"multimodal.{key}={getattr(mm, key)}: not used; {arch} takes "
                              "text only"))
    elif modalities:
        arch = ", ".join(getattr(hf_config, "architectures", None) or []) or "this model"
        for modality, limit in (mm.limit_mm_per_prompt or {}).items():
            count = limit.get("count", 0) if isinstance(limit, Mapping) else limit
            if modality not in modalities and count:
                notes.append((logging.WARNING, f"multimodal.limit_mm_per_prompt.{modality}={count}: not used; {arch} "
                              f"takes {', '.join(modalities)} only (such a request fails alone)"))
    return notes


def read_model_config(cfg: FrameworkConfig, model_path: Path) -> Any:
    """config.json through transformers, refusing a model type that only the checkpoint's own code
    defines (auto_map): transformers would stop to ask on stdin whether to run that code, and this
    framework never runs it. InternVL2's internvl_chat is the exception: its config and tensors
    are read into transformers' InternVL format (models/internvl_chat.py)."""
    import json

    from transformers import CONFIG_MAPPING

    from framework.loader.resolve import load_hf_config
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    if model_type is not None and model_type not in CONFIG_MAPPING and model_type != "internvl_chat":  # read natively
        raise UserError(f"model.path={cfg.model.path!r}: config.json's model_type {model_type!r} is defined only by "
                        "the checkpoint's own code, which this framework never runs (trust_remote_code has "
                        "nothing to trust); use a checkpoint in transformers' own format")
    return load_hf_config(Path(model_path))


def check_before_start(cfg: FrameworkConfig, model_path: Path, hf_config: Any) -> None:
    """Everything the front door can check once it has config.json, before a plan, a rank or a
    weight: the model's limits and architecture, the device; then says which
    knobs do nothing."""
    from framework.models.registry import model_class
    validate_against_model(cfg, hf_config)
    model = model_class(hf_config)  # an architecture without a model class is refused here, not in a rank
    validate_device_present(cfg)
    if cfg.launcher.address:  # the ranks' devices are on other nodes: nothing to judge from here
        return
    import torch
    on_gpu = cfg.model.device == "cuda" or (cfg.model.device == "auto" and torch.cuda.is_available())
    multimodal = hasattr(model, "embed_multimodal") or getattr(hf_config, "vision_config", None) is not None
    for level, note in inert_knobs(cfg, hf_config, on_gpu, multimodal, getattr(model, "modalities", ())):
        log.log(level, "note: %s", note)


def _kv_size_notes(c: Any, on_gpu: bool) -> List[Tuple[int, str]]:
    """A KV-size knob set where another one decides the size: said, never silently ignored."""
    gpu_share, cpu_space = "gpu_memory_utilization", "cpu_kvcache_space_gib"
    if c.kv_cache_memory_gib is not None:
        sizer, unused = f"cache.kv_cache_memory_gib={c.kv_cache_memory_gib}", [cpu_space] + [gpu_share] * on_gpu
    elif on_gpu:
        sizer, unused = "cache.gpu_memory_utilization", [cpu_space]
    else:
        sizer, unused = f"cache.cpu_kvcache_space_gib={c.cpu_kvcache_space_gib}", [gpu_share]
    defaults = {gpu_share: 0.9, cpu_space: 4.0}
    aka = {gpu_share: "", cpu_space: " (VLLM_CPU_KVCACHE_SPACE)"}
    where = "on GPU" if on_gpu else "on the CPU backend"
    return [(logging.WARNING, f"cache.{key}={getattr(c, key)}{aka[key]}: not used {where}; the KV cache's size is "
             f"{sizer}") for key in unused if getattr(c, key) != defaults[key]]

"""When a plan does not fit: the overrides that would make it fit, each re-planned to prove it.

A candidate is a copy-pasteable Hydra override (a group choice such as `quantization=int4` or a
plain key such as `cache.kv_cache_dtype=fp8`) together with what it does to the config. Every
candidate is applied to a copy of the config and planned again; only those that fit are kept,
ranked by the memory they save per rank (the change in headroom). Single overrides come first;
pairs (two structural knobs, or one and the longest max_model_len that then fits) are tried only
when fewer than `enough` single overrides fit.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from framework.config.errors import ConfigError, UserError
from framework.config.schema import CompilationLevel, FrameworkConfig
from framework.config.validate import validate, validate_against_model
from framework.memory.planner import GiB, MemoryPlan, plan_memory
from framework.memory.encoder import IMAGE_MAX_PIXELS
from framework.memory.shape import vision_shape
from framework.multimodal.limits import parse_limits
from framework.resolve import model_max_len, resolve_config

Apply = Callable[[FrameworkConfig], None]
STRUCTURAL = ("quantization", "kv", "tp", "compilation", "multimodal")  # knobs that pair with others


@dataclass
class Candidate:
    overrides: List[str]
    apply: Apply
    group: str  # candidates of one group never combine (two quantization methods, two TP sizes)


@dataclass
class Fix:
    overrides: List[str]
    saves_bytes: int  # per rank: headroom after minus headroom before
    plan: MemoryPlan

    def line(self) -> str:
        p = self.plan
        return (f"{' '.join(self.overrides):<56} # saves {self.saves_bytes / GiB:.2f} GiB/"
                f"{'GPU' if p.backend == 'cuda' else 'rank'}; KV {p.kv_tokens} tokens = "
                f"{p.max_concurrency:.2f} x max_model_len={p.max_model_len}")

    def to_dict(self) -> dict:
        return {"overrides": self.overrides, "saves_bytes": self.saves_bytes, "fits": self.plan.fits,
                "kv_tokens": self.plan.kv_tokens, "max_model_len": self.plan.max_model_len}


def _set(**changes: Any) -> Apply:
    """An Apply that sets dotted keys: _set(**{"cache.kv_cache_dtype": "fp8"})."""
    def apply(cfg: FrameworkConfig) -> None:
        for dotted, value in changes.items():
            group, key = dotted.split(".")
            setattr(getattr(cfg, group), key, value)
    return apply


def _quantization(method: str) -> Apply:  # conf/quantization/<method>.yaml (int4: without its tinygemm copy)
    changes = {"quantization.method": method, "quantization.group_size": 128}
    if method == "int4":
        changes["quantization.int4_tinygemm"] = False
    return _set(**changes)


def _quantization_overrides(method: str, cfg: FrameworkConfig) -> List[str]:
    # int4 as a memory fix is int4 at its smallest: a tinygemm copy asked for on the command line
    # (faster batch-1 decode on CUDA) would take back a third of what int4 saves
    tinygemm = method == "int4" and cfg.quantization.int4_tinygemm
    return [f"quantization={method}"] + (["quantization.int4_tinygemm=false"] if tinygemm else [])


def _multimodal_knobs(cfg: FrameworkConfig, v: Any) -> List[Candidate]:
    """A lower pixel cap (each image's tokens, so the encoder's activations and its output cache)
    and no video (whose frames multiply an item's tokens), as single keys."""
    out: List[Candidate] = []
    if v is None or v.merge_size <= 1:
        return out
    mm = cfg.multimodal
    current = int(mm.mm_processor_kwargs.get("max_pixels", IMAGE_MAX_PIXELS))
    for side in (1024, 768, 512):
        if side * side < current:
            out.append(Candidate([f"++multimodal.mm_processor_kwargs.max_pixels={side * side}"],
                                 _dict_entry("mm_processor_kwargs", "max_pixels", side * side), "max_pixels"))
    limits = parse_limits(mm.limit_mm_per_prompt, mm.language_model_only, ("image", "video"))
    if limits["video"].count and limits["image"].count:
        out.append(Candidate(["++multimodal.limit_mm_per_prompt.video=0"],
                             _dict_entry("limit_mm_per_prompt", "video", 0), "video_limit"))
    return out


def _dict_entry(key: str, entry: str, value: Any) -> Apply:
    def apply(cfg: FrameworkConfig) -> None:
        setattr(cfg.multimodal, key, {**getattr(cfg.multimodal, key), entry: value})
    return apply


def _nice_len(n: int, block_size: int) -> int:
    """A round context length at most n: a multiple of 1024 from 2048 up, else of the block size."""
    step = 1024 if n >= 2048 else block_size
    return n // step * step


def _candidates(cfg: FrameworkConfig, hf_config: Any, plan: MemoryPlan) -> List[Candidate]:
    cuda = plan.backend == "cuda"
    out: List[Candidate] = []
    if plan.quantization in ("none", "fp8", "int8"):
        methods = ["int4"] if plan.quantization != "none" else ["fp8", "int8", "int4"]  # gentlest first
        for m in methods:  # (an int4 group size the layers do not allow fails its re-plan)
            out.append(Candidate(_quantization_overrides(m, cfg), _quantization(m), "quantization"))
    if cfg.cache.kv_cache_dtype != "fp8":
        out.append(Candidate(["cache.kv_cache_dtype=fp8"], _set(**{"cache.kv_cache_dtype": "fp8"}), "kv"))
    if cuda:  # CPU ranks share one host's RAM: more of them does not help
        for n in (2, 4, 8):
            if n > cfg.parallelism.tensor_parallel_size:
                extra = ["launcher=auto"] if cfg.launcher.name == "local" else []
                out.append(Candidate([f"parallelism.tensor_parallel_size={n}"] + extra,
                                     _set(**{"parallelism.tensor_parallel_size": n, "launcher.name": "auto"}), "tp"))
    if plan.graph_pool_bytes:  # conf/compilation/eager.yaml
        out.append(Candidate(["compilation=eager"], _set(**{"compilation.level": CompilationLevel.NO_COMPILATION,
                                                            "compilation.cudagraph_capture_sizes": None,
                                                            "compilation.enforce_eager": True}), "compilation"))
    if cuda and cfg.cache.gpu_memory_utilization < 0.95:
        out.append(Candidate(["cache.gpu_memory_utilization=0.95"],
                             _set(**{"cache.gpu_memory_utilization": 0.95}), "utilization"))
    if plan.encoder_bytes:  # conf/multimodal/text_only.yaml and images_only.yaml
        out.append(Candidate(["multimodal=text_only"], _set(**{
            "multimodal.limit_mm_per_prompt": {"image": 0, "video": 0}, "multimodal.mm_processor_kwargs": {},
            "multimodal.mm_input_cache_gib": 0, "multimodal.mm_processor_cache_gib": 0}), "multimodal"))
        v = vision_shape(hf_config)
        if v is not None and v.temporal_patch_size > 1:
            out.append(Candidate(["multimodal=images_only"], _set(**{
                "multimodal.limit_mm_per_prompt": {"image": 3, "video": 0},
                "multimodal.mm_processor_kwargs": {"max_pixels": 589824}}), "multimodal"))
        out += _multimodal_knobs(cfg, v)
    for key, floor in (("max_num_batched_tokens", 256), ("max_num_seqs", 1)):
        value = getattr(cfg.cache, key) or getattr(plan, key)  # null: what the plan resolved it to
        smaller = [value // 2 ** k for k in range(1, 8) if value // 2 ** k >= floor]
        for n in smaller:
            out.append(Candidate([f"cache.{key}={n}"], _set(**{f"cache.{key}": n}), key))
    need = -(-plan.max_model_len // plan.block_size) * plan.block_size * plan.kv_bytes_per_token / GiB
    if cfg.cache.kv_cache_memory_gib is not None:  # a set size: one request's worth, or what the device has left
        room = (plan.budget_bytes - (plan.rank_total_bytes - plan.kv_cache_bytes)) / GiB
        gib = -(-need * 100 // 1) / 100 if need > cfg.cache.kv_cache_memory_gib else (room * 100 // 1) / 100
        if gib > 0 and gib != cfg.cache.kv_cache_memory_gib:
            out.append(Candidate([f"cache.kv_cache_memory_gib={gib:g}"],
                                 _set(**{"cache.kv_cache_memory_gib": gib}), "kv_size"))
    elif not cuda:
        if need > cfg.cache.cpu_kvcache_space_gib:
            gib = -(-need * 4 // 1) / 4  # up to the next quarter GiB
            out.append(Candidate([f"cache.cpu_kvcache_space_gib={gib:g}"],
                                 _set(**{"cache.cpu_kvcache_space_gib": gib}), "cpu_kv"))
    return out


def _length_fix(cfg: FrameworkConfig, hf_config: Any, device_memory_bytes: Optional[int]) -> Optional[Candidate]:
    """cache.max_model_len=N: the longest round length that fits under `cfg`."""
    probe = copy.deepcopy(cfg)
    probe.cache.max_model_len = "auto"
    try:
        validate_against_model(probe, hf_config)  # e.g. a TP size that does not divide the heads
        longest = resolve_config(probe, hf_config, device_memory_bytes).cache.max_model_len
    except (ConfigError, UserError):
        return None
    n = _nice_len(longest, cfg.cache.block_size)
    current = cfg.cache.max_model_len
    current = model_max_len(hf_config) if current is None else current
    if n <= 0 or (isinstance(current, int) and n >= current):
        return None
    return Candidate([f"cache.max_model_len={n}"], _set(**{"cache.max_model_len": n}), "length")


def _try(cfg: FrameworkConfig, hf_config: Any, device_memory_bytes: Optional[int], base: MemoryPlan,
         candidates: List[Candidate]) -> Optional[Fix]:
    trial = copy.deepcopy(cfg)
    for c in candidates:
        c.apply(trial)
    try:
        validate(trial)
        validate_against_model(trial, hf_config)
        plan = plan_memory(trial, hf_config, device_memory_bytes)
    except (ConfigError, UserError):  # e.g. a TP size that does not divide the heads
        return None
    if not plan.fits:
        return None
    overrides = [o for c in candidates for o in c.overrides]
    return Fix(list(dict.fromkeys(overrides)), plan.headroom_bytes - base.headroom_bytes, plan)


def suggest_fixes(cfg: FrameworkConfig, hf_config: Any, device_memory_bytes: Optional[int],
                  base: Optional[MemoryPlan] = None, enough: int = 3, most: int = 8) -> List[Fix]:
    base = base or plan_memory(cfg, hf_config, device_memory_bytes)
    if base.fits:
        return []
    singles = _candidates(cfg, hf_config, base)
    length = _length_fix(cfg, hf_config, device_memory_bytes)
    found: List[Fix] = []
    first_fit: Dict[str, int] = {}  # group -> index of its gentlest candidate that fits alone
    for i, c in enumerate(singles + ([length] if length else [])):
        if c.group in first_fit and c.group in ("tp", "max_num_batched_tokens", "max_num_seqs"):
            continue  # the gentlest size that fits is the one to suggest
        fix = _try(cfg, hf_config, device_memory_bytes, base, [c])
        if fix:
            found.append(fix)
            first_fit.setdefault(c.group, i)
    found.sort(key=lambda f: -f.saves_bytes)
    if len(found) >= enough:
        return found[:most]

    # pairs: per pair of knobs, the gentlest sizes that fit (candidates come gentlest first),
    # and of a knob that fits alone only its gentler sizes (tp=2 with a shorter context, not tp=4)
    structural = [c for i, c in enumerate(singles)
                  if c.group in STRUCTURAL and i < first_fit.get(c.group, len(singles))]
    pairs: Dict[tuple, Fix] = {}
    for a, b in itertools.combinations(structural, 2):
        if a.group != b.group and (a.group, b.group) not in pairs:
            fix = _try(cfg, hf_config, device_memory_bytes, base, [a, b])
            if fix:
                pairs[(a.group, b.group)] = fix
    for a in structural:  # the longest context that fits beside each structural change
        if (a.group, "length") in pairs:
            continue
        applied = copy.deepcopy(cfg)
        a.apply(applied)
        shorter = _length_fix(applied, hf_config, device_memory_bytes)
        fix = shorter and _try(cfg, hf_config, device_memory_bytes, base, [a, shorter])
        if fix:
            pairs[(a.group, "length")] = fix
    return (found + sorted(pairs.values(), key=lambda f: -f.saves_bytes))[:most]


def format_fixes(base: MemoryPlan, fixes: List[Fix]) -> str:
    if not fixes:
        return ("No single override or pair of overrides makes it fit; try a larger GPU, more GPUs "
                "(parallelism.tensor_parallel_size) or a smaller model.")
    lines = ["Overrides that make it fit, each re-planned (add them to the command line, replacing "
             "any earlier value of the same key):"]
    lines += [f"  {f.line()}" for f in fixes]
    return "\n".join(lines)

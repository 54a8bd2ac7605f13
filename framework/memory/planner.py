"""Know before you allocate: each rank's memory, predicted from config.json and the knobs alone.

No weight is read and no GPU is needed. The KV cache gets what is left, exactly as the engine
sizes it: on a GPU `gpu_memory_utilization x device - everything else` (ModelRunner.
_gpu_kv_budget, which measures "everything else" with a profiling forward; we count it), on the
CPU backend `cpu_kvcache_space_gib`; `kv_cache_memory_gib`, when set, is the size on either (on a
GPU it must fit beside everything else in the whole device); then, with prefix caching off, no
more than max_num_seqs x max_model_len (LLMEngine caps it so). `num_gpu_blocks_override` wins over all.

The verdict is the engine's own start-up test: the KV cache must hold one request of
max_model_len. Headroom is what is left beyond that request; negative headroom is what must be
saved per rank, which is how framework/memory/fixes.py ranks its suggestions.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from framework.config.errors import UserError
from framework.config.schema import FrameworkConfig
from framework.engine.block_manager import split_kv_budget, window_blocks_per_request
from framework.memory.activation import Step, forward_peak, graph_pool_bytes
from framework.memory.encoder import encoder_budget
from framework.memory.model_count import count_model
from framework.memory.shape import architecture, vision_shape
from framework.resolve import (auto_notes, capture_sizes, default_max_num_batched_tokens, model_max_len, pick_device,
                               pick_dtype, resolve_config)

GiB = 1 << 30
MiB = 1 << 20
# Memory outside torch's allocator on each rank. GPU: the CUDA context, cuBLAS handles and the
# kernels' module images (measured 0.74-0.75 GiB on an H100 and an H200, torch 2.11 + CUDA 13),
# plus with TP NCCL's buffers and the peer-memory all-reduce's (measured at TP=2 on two H200s: the
# rank that held no other process's context used 0.99 GiB more than a plan that counted 256 MiB
# here, 0.26 GiB of it in the CUDA graphs; BENCHMARKS.md). CPU: the Python interpreter with torch,
# transformers and the engine imported (370 MiB resident, measured with torch 2.13 on x86-64).
CUDA_CONTEXT_BYTES = 768 * MiB
NCCL_BYTES = 1 * GiB
CPU_RUNTIME_BYTES = 384 * MiB
MAX_AUTO_SEQS = 1024  # max_num_seqs=auto searches up to this many seats


@dataclass
class MemoryPlan:
    model: str
    architecture: str
    backend: str  # cuda | cpu
    device_memory_bytes: int  # the GPU's total memory, or the host's RAM for the CPU backend
    gpu_memory_utilization: float
    tensor_parallel_size: int
    dtype: str
    quantization: str
    kv_cache_dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    # per rank, bytes
    weight_bytes: int
    rotary_bytes: int
    activation_bytes: int
    graph_pool_bytes: int
    encoder_bytes: int
    runtime_bytes: int  # CUDA context (+ NCCL) on GPU, Python + torch on CPU: outside torch tensors
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_blocks: int
    kv_tokens: int
    kv_budget_tokens: int  # what the memory would hold before the max_num_seqs x max_model_len cap
    budget_bytes: int  # what one rank may use: utilization x GPU, or host RAM / ranks on CPU
    host_cache_bytes: int  # multimodal input cache in host RAM (per engine)
    fits: bool
    headroom_bytes: int
    max_concurrency: float  # requests of max_model_len the KV cache holds at once
    verdict: str
    details: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    # Models with sliding-window layers: KV bytes per token of each layer kind, and per token of
    # context when window layers keep only their window's blocks, against the all-full layout.
    kv_layout: Dict[str, Any] = field(default_factory=dict)

    @property
    def rank_total_bytes(self) -> int:
        return (self.weight_bytes + self.rotary_bytes + self.activation_bytes + self.graph_pool_bytes
                + self.encoder_bytes + self.runtime_bytes + self.kv_cache_bytes)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rank_total_bytes"] = self.rank_total_bytes
        return out

    def format_table(self) -> str:
        where = (f"GPU {self.device_memory_bytes / GiB:.1f} GiB x {self.gpu_memory_utilization:.2f}"
                 if self.backend == "cuda" else f"CPU backend, host RAM {self.device_memory_bytes / GiB:.1f} GiB")
        rows = [("weights", self.weight_bytes), ("rotary tables", self.rotary_bytes),
                ("activations", self.activation_bytes), ("CUDA graph pool", self.graph_pool_bytes),
                ("multimodal encoder", self.encoder_bytes),
                ("CUDA context" if self.backend == "cuda" else "Python + torch", self.runtime_bytes),
                ("KV cache", self.kv_cache_bytes)]
        lines = [f"Memory plan per rank: {self.model} [{self.architecture}] on {where}, "
                 f"TP={self.tensor_parallel_size}",
                 f"  {self.dtype}, quantization={self.quantization}, KV cache {self.kv_cache_dtype} "
                 f"({self.kv_bytes_per_token / 1024:.1f} KiB/token), max_model_len={self.max_model_len}, "
                 f"max_num_seqs={self.max_num_seqs}, max_num_batched_tokens={self.max_num_batched_tokens}"]
        lines += [f"  {name:<20}{b / GiB:>8.2f} GiB   {self.details.get(name, '')}".rstrip() for name, b in rows]
        budget = "budget" if self.backend == "cuda" else "host share"
        lines.append(f"  {'total':<20}{self.rank_total_bytes / GiB:>8.2f} GiB   "
                     f"of {self.budget_bytes / GiB:.2f} GiB {budget}")
        if self.host_cache_bytes:
            lines.append(f"  {'host: mm input cache':<20}{self.host_cache_bytes / GiB:>8.2f} GiB")
        lines += self._kv_layout_lines()
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(self.verdict)
        return "\n".join(lines)


    def _kv_layout_lines(self) -> List[str]:
        k = self.kv_layout
        if not k:
            return []
        lines = [f"  KV layout: {k['num_full_layers']} full-attention layers {k['full_bytes_per_token'] / 1024:.1f} "
                 f"KiB/token, {k['num_sliding_layers']} sliding-window layers (window {k['sliding_window']}) "
                 f"{k['sliding_bytes_per_token'] / 1024:.1f} KiB/token"]
        for n in sorted(int(key.rsplit("_", 1)[1]) for key in k if key.startswith("per_context_token_windowed_")):
            windowed, full = k[f"per_context_token_windowed_{n}"], k[f"per_context_token_all_full_{n}"]
            lines.append(f"    per token of a {n}-token context: {windowed / 1024:.1f} KiB with window layers "
                         f"holding only their window, {full / 1024:.1f} KiB all-full ({full / windowed:.1f}x)")
        full = k[f"per_context_token_all_full_{self.max_model_len}"]
        if self.kv_cache_bytes:
            lines.append(f"    window layers keep a pool of their own, freed as the window passes: the KV cache's "
                         f"{self.kv_cache_bytes / GiB:.2f} GiB hold {self.max_concurrency:.2f} requests of "
                         f"max_model_len, {self.kv_cache_bytes / (full * self.max_model_len):.2f} in the all-full "
                         f"layout")
        return lines


# --- where the plan is for -------------------------------------------------------------
def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def engine_device_memory(cfg: FrameworkConfig) -> Optional[int]:
    """The total memory of the GPU the engine will run on; None for the CPU backend."""
    device = pick_device(cfg.model.device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device.index or 0).total_memory


def target_device_memory(cfg: FrameworkConfig) -> Optional[int]:
    """What task=plan plans for: task.device_memory_gib, else the GPU present, else None (CPU)."""
    if cfg.task.device_memory_gib:
        return int(cfg.task.device_memory_gib * GiB)
    return engine_device_memory(cfg)


# --- the plan ----------------------------------------------------------------------------
def plan_memory(cfg: FrameworkConfig, hf_config: Any, device_memory_bytes: Optional[int] = None) -> MemoryPlan:
    """Plan each rank. `device_memory_bytes` is a GPU's total memory; None plans the CPU backend.
    Any `auto` left in `cfg` is resolved first (framework/resolve.py), as a run would."""
    resolved = resolve_config(cfg, hf_config, device_memory_bytes)
    plan = _plan(resolved, hf_config, device_memory_bytes, resolved.cache.max_model_len, resolved.cache.max_num_seqs)
    plan.notes[:0] = auto_notes(cfg, resolved)
    return plan


def resolve_auto_limits(cfg: FrameworkConfig, hf_config: Any, device_memory_bytes: Optional[int] = None
                        ) -> Tuple[int, int]:
    """(max_model_len, max_num_seqs) with `auto` replaced by the largest value that fits:
    max_model_len the longest request that fits (up to the model's limit; with max_num_seqs=auto
    it is chosen first, for one sequence); max_num_seqs the most requests of max_model_len the
    KV cache holds at once (full concurrency, so no preemption), at most
    min(MAX_AUTO_SEQS, max_num_batched_tokens). Both searches are binary: every cost grows with
    either value."""
    if cfg.cache.max_num_batched_tokens is None:  # called on a config not yet resolved
        tokens = default_max_num_batched_tokens(device_memory_bytes)
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, max_num_batched_tokens=tokens))
    length, seqs = cfg.cache.max_model_len, cfg.cache.max_num_seqs
    limit = model_max_len(hf_config)
    if length is None:
        length = limit
    if length == "auto":
        probe_seqs = 1 if seqs == "auto" else int(seqs)
        smallest = _plan(cfg, hf_config, device_memory_bytes, cfg.cache.block_size, probe_seqs)
        if not smallest.fits:
            raise UserError(f"cache.max_model_len=auto: not even {cfg.cache.block_size} tokens fit. {smallest.verdict}")
        length = _largest(cfg.cache.block_size, limit,
                          lambda n: _plan(cfg, hf_config, device_memory_bytes, n, probe_seqs).fits)
    length = int(length)
    if seqs != "auto":
        return length, int(seqs)
    blocks_per_request = -(-length // cfg.cache.block_size)

    def fits(n: int) -> bool:
        plan = _plan(cfg, hf_config, device_memory_bytes, length, n)
        return plan.fits and plan.kv_budget_tokens // cfg.cache.block_size >= n * blocks_per_request

    return length, _largest(1, max(1, min(MAX_AUTO_SEQS, cfg.cache.max_num_batched_tokens)), fits)


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest n in [lo, hi] with ok(n), for ok true up to some n and false after (lo if none)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


@dataclass
class _WindowGroup:
    """What engine.block_manager.split_kv_budget reads of a KV cache spec."""
    block_size: int
    sliding_window: int
    bytes_per_block: int  # of the full layers
    window_bytes_per_block: int


@dataclass
class _Costs:
    """Everything but the KV cache, per rank, with a line of detail for each."""
    dtype: torch.dtype
    quantization: str
    kv_per_token: int
    weights: int = 0
    rotary: int = 0
    activation: int = 0
    graph_pool: int = 0
    encoder: int = 0
    runtime: int = 0
    host_cache: int = 0
    details: Dict[str, str] = field(default_factory=dict)
    kv_layout: Dict[str, Any] = field(default_factory=dict)  # models with sliding-window layers
    window_group: Optional["_WindowGroup"] = None  # their own KV pool, as the engine allocates it

    @property
    def fixed(self) -> int:
        return self.weights + self.rotary + self.activation + self.graph_pool + self.encoder + self.runtime


def _costs(cfg: FrameworkConfig, hf_config: Any, cuda: bool, max_model_len: int, max_num_seqs: int) -> _Costs:
    c, tp = cfg.cache, cfg.parallelism.tensor_parallel_size
    dtype = pick_dtype(cfg.model.dtype, torch.device("cuda" if cuda else "cpu"), hf_config)
    a = dtype.itemsize
    kv_bytes = 1 if c.kv_cache_dtype == "fp8" else a
    method = cfg.quantization.method
    # the largest rank (ranks differ only where a split is uneven)
    m = max(count_model(hf_config, dtype, tp, cfg.quantization, cfg.multimodal, cuda), key=lambda r: r.weight_bytes)
    s = m.decoder
    out = _Costs(dtype, method, m.kv_bytes_per_token(kv_bytes))

    out.weights = m.weight_bytes - m.vision_bytes  # the tower is counted with the encoder below
    other = out.weights - m.linear_bytes - m.embedding_bytes
    out.details["weights"] = (f"linear layers {m.linear_bytes / GiB:.2f} ({method}), embedding + lm_head "
                              f"{m.embedding_bytes / GiB:.2f}, norms + biases {other / GiB:.2f}")
    out.rotary = m.rotary_bytes_per_position * max_model_len
    out.details["rotary tables"] = f"fp32 cos/sin of {max_model_len} positions, shared by all layers"
    kinds = m.kv_bytes_by_kind(kv_bytes)
    if kinds["sliding"]:
        windows = sorted({a.sliding_window for a in m.attention if a.sliding_window})
        if len(windows) == 1:  # the engine gives the window layers a KV group of their own (kv_cache_spec)
            out.window_group = _WindowGroup(c.block_size, windows[0], kinds["full"] * c.block_size,
                                            kinds["sliding"] * c.block_size)
        out.kv_layout = {"full_bytes_per_token": kinds["full"], "sliding_bytes_per_token": kinds["sliding"],
                         "sliding_window": windows, "num_full_layers": sum(1 for a in m.attention if not a.sliding_window),
                         "num_sliding_layers": sum(1 for a in m.attention if a.sliding_window)}
        for n in sorted({max_model_len, 32768, 131072}):
            windowed = m.kv_bytes_for_context(kv_bytes, n, c.block_size)
            out.kv_layout[f"per_context_token_windowed_{n}"] = windowed / n
            out.kv_layout[f"per_context_token_all_full_{n}"] = kinds["full"] + kinds["sliding"]

    rows = min(max_num_seqs, c.max_num_batched_tokens)
    cpu_kv_tokens = int(c.cpu_kvcache_space_gib * GiB // (out.kv_per_token * c.block_size)) * c.block_size
    step = Step(tokens=c.max_num_batched_tokens, logits_rows=rows, context=max_model_len,
                kv_tokens=cpu_kv_tokens, block_size=c.block_size)
    group = cfg.quantization.group_size
    out.activation = forward_peak(s, tp, step, a, kv_bytes, method, group, reference=not cuda)
    out.details["activations"] = f"{step.tokens} tokens a step, logits of {rows} rows"

    if cuda and not cfg.compilation.enforce_eager:
        sizes = capture_sizes(cfg.compilation.cudagraph_capture_sizes, max_num_seqs)
        out.graph_pool = graph_pool_bytes(s, tp, sizes, step, a, kv_bytes, method, group)
        out.details["CUDA graph pool"] = f"{len(sizes)} decode sizes up to {max(sizes)}"

    v = vision_shape(hf_config)
    if v is not None:
        limits = {} if not cfg.multimodal.language_model_only else {"image": 0, "video": 0, "audio": 0}
        enc = encoder_budget(v, {**cfg.multimodal.limit_mm_per_prompt, **limits}, cfg.multimodal.mm_processor_kwargs,
                             c.max_num_batched_tokens, max_model_len, a)
        out.encoder = enc.total
        out.details["multimodal encoder"] = "every modality limited to 0"
        if enc.tokens:
            out.host_cache = int(cfg.multimodal.processor_cache_gib * GiB)
            items = ", ".join(f"{m} {n} tokens" for m, n in enc.item_tokens.items())
            out.details["multimodal encoder"] = (f"weights {enc.weight_bytes / GiB:.2f} + {enc.tokens} tokens at "
                                                 f"once (largest item: {items})")

    out.runtime = (CUDA_CONTEXT_BYTES + (NCCL_BYTES if tp > 1 else 0)) if cuda else CPU_RUNTIME_BYTES
    out.details["CUDA context" if cuda else "Python + torch"] = "estimate, with NCCL's buffers" if cuda and tp > 1 \
        else "estimate"
    return out


def _plan(cfg: FrameworkConfig, hf_config: Any, device_memory_bytes: Optional[int], max_model_len: int,
          max_num_seqs: int) -> MemoryPlan:
    c, tp = cfg.cache, cfg.parallelism.tensor_parallel_size
    cuda = device_memory_bytes is not None
    costs = _costs(cfg, hf_config, cuda, max_model_len, max_num_seqs)
    group = costs.window_group
    block_bytes = group.bytes_per_block if group else costs.kv_per_token * c.block_size
    blocks_per_request = -(-max_model_len // c.block_size)
    notes: List[str] = []

    # the KV cache: what the engine would allocate (ModelRunner.num_blocks_that_fit, LLMEngine's cap)
    requested = None if c.kv_cache_memory_gib is None else int(c.kv_cache_memory_gib * GiB)
    if cuda:
        budget = int(device_memory_bytes * (1.0 if requested is not None else c.gpu_memory_utilization))
        kv_budget = max(0, budget - costs.fixed) if requested is None else requested
    else:
        budget = (host_memory_bytes() - costs.host_cache) // tp
        kv_budget = int(c.cpu_kvcache_space_gib * GiB) if requested is None else requested
    window_blocks = window_need = 0
    if group:  # full layers' blocks and window layers' blocks, split as the engine splits them
        budget_blocks, window_blocks = split_kv_budget(kv_budget, group, max_model_len, c.max_num_batched_tokens)
        chunk = min(blocks_per_request, -(-c.max_num_batched_tokens // c.block_size))
        window_need = window_blocks_per_request(c.block_size, group.sliding_window, max_model_len) + chunk
    else:
        budget_blocks = kv_budget // block_bytes
    if c.num_gpu_blocks_override:
        budget_blocks = c.num_gpu_blocks_override
        window_blocks = budget_blocks if group else 0
    blocks = budget_blocks
    if not c.enable_prefix_caching and blocks > max_num_seqs * blocks_per_request:
        blocks = max_num_seqs * blocks_per_request
        notes.append(f"KV cache capped at max_num_seqs x max_model_len = {blocks * c.block_size} tokens "
                     f"(prefix caching off); the memory would hold {budget_blocks * c.block_size}")
    if group and not c.enable_prefix_caching:
        window_blocks = min(window_blocks, max_num_seqs * (window_need - chunk) + chunk)
    window_bytes = window_blocks * group.window_bytes_per_block if group else 0
    kv_cache, kv_tokens = blocks * block_bytes + window_bytes, blocks * c.block_size
    concurrency = kv_tokens / max_model_len
    costs.details["KV cache"] = f"{kv_tokens} tokens = {concurrency:.2f} x max_model_len"
    if requested is not None and not c.num_gpu_blocks_override:
        costs.details["KV cache"] += f" (cache.kv_cache_memory_gib={c.kv_cache_memory_gib:g})"
    if group:
        costs.details["KV cache"] += (f"; window layers: {window_blocks} blocks of their own "
                                      f"({window_bytes / GiB:.2f} GiB)")
    one_request = blocks_per_request * block_bytes + (window_need * group.window_bytes_per_block if group else 0)

    # the verdict: the engine starts only if the KV cache holds one request of max_model_len
    fixed_size = bool(c.num_gpu_blocks_override) or requested is not None
    if budget_blocks < blocks_per_request and (fixed_size or not cuda):  # a set size short of one request
        pool = budget_blocks * block_bytes if c.num_gpu_blocks_override else kv_budget
        headroom = pool - one_request
    elif cuda:
        need = costs.fixed + (kv_cache if fixed_size else one_request)
        headroom = budget - need
    else:  # every rank must fit in its share of the host's RAM
        headroom = budget - (costs.fixed + kv_cache)
    fits = headroom >= 0 and budget_blocks >= blocks_per_request
    unit = "GPU" if cuda else "rank"
    if fits:
        beyond = "its KV cache" if cuda and fixed_size else f"one {max_model_len}-token request"
        verdict = (f"FITS: {headroom / GiB:.2f} GiB/{unit} to spare beyond {beyond}; "
                   f"the KV cache holds {kv_tokens} tokens, {concurrency:.2f} requests of max_model_len at once")
    elif cuda and fixed_size and budget_blocks >= blocks_per_request:
        verdict = f"DOES NOT FIT: {-headroom / GiB:.2f} GiB/GPU short of holding its {kv_cache / GiB:.2f} GiB KV cache"
    elif cuda or budget_blocks < blocks_per_request:
        verdict = (f"DOES NOT FIT: {-headroom / GiB:.2f} GiB/{unit} short of holding one "
                   f"{max_model_len}-token request")
    else:
        verdict = f"DOES NOT FIT: each rank needs {-headroom / GiB:.2f} GiB more than its share of the host's RAM"

    dtype = str(costs.dtype).replace("torch.", "")
    return MemoryPlan(
        model=cfg.model.path, architecture=architecture(hf_config), backend="cuda" if cuda else "cpu",
        device_memory_bytes=int(device_memory_bytes if cuda else budget * tp + costs.host_cache),
        gpu_memory_utilization=c.gpu_memory_utilization if requested is None else 1.0, tensor_parallel_size=tp,
        dtype=dtype,
        quantization=costs.quantization, kv_cache_dtype="fp8" if c.kv_cache_dtype == "fp8" else dtype,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
        block_size=c.block_size, weight_bytes=costs.weights, rotary_bytes=costs.rotary,
        activation_bytes=costs.activation, graph_pool_bytes=costs.graph_pool, encoder_bytes=costs.encoder,
        runtime_bytes=costs.runtime, kv_cache_bytes=kv_cache, kv_bytes_per_token=costs.kv_per_token,
        kv_blocks=blocks, kv_tokens=kv_tokens, kv_budget_tokens=budget_blocks * c.block_size, budget_bytes=budget,
        host_cache_bytes=costs.host_cache, fits=fits, headroom_bytes=int(headroom),
        max_concurrency=round(concurrency, 3), verdict=verdict, details=costs.details, notes=notes,
        kv_layout=costs.kv_layout)

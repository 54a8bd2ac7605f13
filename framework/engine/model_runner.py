"""Runs the model on one rank: builds it, loads weights, owns the KV cache, executes steps.

Rank 0 hands each StepInput to `run`; with tensor parallelism it first broadcasts the step
to the other ranks, which wait in `serve_forever` (no Ray call per step).
"""
from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from framework.config.errors import ConfigError, UserError
from framework.config.schema import CompilationLevel, FrameworkConfig
from framework.engine.block_manager import split_kv_budget
from framework.engine.cuda_graphs import CudaGraphRunner, device_memory, measure_graph_memory
from framework.engine.step_input import StepInput
from framework.engine.step_tensors import HostStaging, fill_sampled
from framework.layers.attention import Attention, AttentionMetadata
from framework.layers.quantization import QuantResolver
from framework.loader import load_weights
from framework.loader.weights import LoadStats
from framework.models.context import ModelContext
from framework.multimodal.budget import encoder_budget_tokens
from framework.models.interface import attention_layers, build_model
from framework.parallel import ParallelInfo, set_symm_all_reduce, step_group
from framework.symm_all_reduce import make_symm_all_reduce
from framework.resolve import is_resolved, pick_device, pick_dtype
from kernels._triton import pdl_supported, set_pdl
from kernels.argmax import argmax_rows
from kernels.precompile import KernelPrecompiler, precompiler_for

log = logging.getLogger(__name__)
GiB = 1 << 30


def compilation_level(value: Any) -> CompilationLevel:
    """compilation.level as YAML may give it: the enum, its number or its name."""
    return CompilationLevel[value] if isinstance(value, str) else CompilationLevel(int(value))


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return torch.float8_e4m3fn if name == "fp8" else model_dtype


def kv_cache_spec(layers: List[Attention], block_size: int, dtype: torch.dtype) -> "KVCacheSpec":
    """One block shape for every layer; sliding-window layers (all of one window) form a KV group
    of their own, whose blocks are freed as the window passes (engine/block_manager.py)."""
    shapes = {(layer.num_kv_heads, layer.head_dim) for layer in layers}
    if len(shapes) != 1:
        raise NotImplementedError(f"layers with different KV shapes {sorted(shapes)} need a KV cache per layer group")
    (heads, head_dim), = shapes
    windows = {layer.spec.sliding_window for layer in layers if layer.spec.sliding_window}
    if len(windows) != 1:  # none, or several windows: every layer keeps every block
        return KVCacheSpec(len(layers), heads, head_dim, block_size, dtype)
    num_window = sum(1 for layer in layers if layer.spec.sliding_window)
    return KVCacheSpec(len(layers) - num_window, heads, head_dim, block_size, dtype, num_window, windows.pop())


@dataclass
class KVCacheSpec:
    num_layers: int  # that keep every block (all of them when there is no window group)
    num_kv_heads: int  # on this rank
    head_dim: int
    block_size: int
    dtype: torch.dtype
    num_window_layers: int = 0  # the sliding-window group's layers
    sliding_window: int = 0

    @property
    def layer_block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        """Of the full group (the block count that bounds a request's context)."""
        return self.num_layers * self.layer_block_bytes

    @property
    def window_bytes_per_block(self) -> int:
        return self.num_window_layers * self.layer_block_bytes


class ModelRunner:
    def __init__(self, cfg: FrameworkConfig, model_path: Path, hf_config: Any, tp: ParallelInfo = ParallelInfo()):
        """`cfg` is resolved (framework/resolve.py): every `auto` is a value already."""
        assert is_resolved(cfg), "ModelRunner takes a resolved config (framework.resolve.resolve_config)"
        self.cfg, self.tp = cfg, tp
        max_model_len, max_num_seqs = cfg.cache.max_model_len, cfg.cache.max_num_seqs
        self.device = pick_device(cfg.model.device)
        self.dtype = pick_dtype(cfg.model.dtype, self.device, hf_config)
        if self.device.type == "cuda":
            # A Ray rank has made its own GPU the current device (launchers/rank.py); alone, that is 0
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", torch.cuda.current_device())
            if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
                # Segments that grow in place: the differently sized prefill steps otherwise leave split
                # segments the allocator cannot give back (an H100 run of 256 requests ended 0.96 GiB
                # over its gpu_memory_utilization budget; with this, 0.12 GiB).
                set_allocator = getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
                    or torch.cuda.memory._set_allocator_settings  # torch < 2.10; deprecated after
                set_allocator("expandable_segments:True")
            # compilation.programmatic_dependent_launch: how every Triton kernel of this process launches
            set_pdl(cfg.compilation.programmatic_dependent_launch)
            if cfg.compilation.programmatic_dependent_launch and not pdl_supported(self.device.index):
                log.info("compilation.programmatic_dependent_launch: not available on %s (compute capability "
                         "9.0 and a Triton with launch_pdl needed); kernels launch one after another",
                         torch.cuda.get_device_name(self.device))
        torch.manual_seed(cfg.model.seed)
        # How this rank's all-reduces travel (framework/parallel.py): NCCL or gloo, and on CUDA
        # ranks a peer-memory one-shot for small messages unless parallelism.custom_all_reduce=false.
        self.symm_all_reduce = None
        if tp.size > 1 and cfg.parallelism.custom_all_reduce and tp.one_host:  # None on CPU ranks
            self.symm_all_reduce = make_symm_all_reduce(dist.group.WORLD, self.device, self.dtype)
        set_symm_all_reduce(self.symm_all_reduce)
        # Triton's compile workers start now, so that their imports overlap building the model
        self.precompiler: Optional[KernelPrecompiler] = precompiler_for(self.device.type,
                                                                        cfg.compilation.compile_workers, tp.size)
        if self.precompiler is not None:
            self.precompiler.start()
        self.precompile_stats: Dict[str, Any] = {}

        start = time.perf_counter()
        # the linear layers' storage (quantization.method, per layer) is built, and checked, before
        # any weight is read
        ctx = ModelContext(hf_config, self.dtype, max_model_len, tp,
                           QuantResolver.build(cfg.quantization, hf_config, tp.size, self.device.type == "cuda"),
                           cfg.multimodal)
        self.model = build_model(ctx, self.device)
        run = getattr(self.model, "bidirectional_mm_run_tokens", 0)
        if run > cfg.cache.max_num_batched_tokens:  # the front door says so first (config/validate.py)
            raise UserError(f"cache.max_num_batched_tokens={cfg.cache.max_num_batched_tokens}: must be >= {run}: "
                            f"an image's {run} tokens attend to each other both ways and are computed in one "
                            "prefill chunk (or run on text with multimodal=text_only)")
        self.load_stats: LoadStats = load_weights(self.model, cfg.model, model_path, cfg.quantization.method, tp)
        self.load_seconds = time.perf_counter() - start

        # multimodal: the encoder cache budget (embedding tokens), which the memory profile runs
        vision = getattr(self.model, "vision_modules", lambda: [])()
        self.encoder_budget_tokens = (encoder_budget_tokens(cfg, model_path, hf_config, self.model.modalities)
                                      if vision else 0)
        self.attn_layers: List[Attention] = attention_layers(self.model)
        self.kv_spec = kv_cache_spec(self.attn_layers, cfg.cache.block_size,
                                     kv_cache_dtype(cfg.cache.kv_cache_dtype, self.dtype))
        self.num_blocks = self.num_window_blocks = 0
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.staging = HostStaging(self.device)  # one pinned host-to-device copy per step
        async_scheduling = cfg.cache.async_scheduling
        if async_scheduling is None:
            async_scheduling = self.device.type == "cuda"
        self.async_scheduling = bool(async_scheduling)
        # The previous step's greedy tokens, on the device, in its logits-row order (async scheduling).
        # Every rank holds the full logits (the LM head gathers them), so every rank takes the same
        # argmax into its own buffer and fills the next step's placeholders without rank 0's help.
        self.sampled = torch.zeros(max_num_seqs, dtype=torch.int64, device=self.device)
        self.compilation_level = compilation_level(cfg.compilation.level)
        self.forward = self._compile_forward()
        self.graph_sizes = self._graph_sizes()  # [] on CPU and with enforce_eager
        self.graphs: Optional[CudaGraphRunner] = None
        self.last_graphed = False  # whether the last step replayed a CUDA graph (engine/step_log.py)
        self.gpu_memory: Dict[str, Any] = {}  # the KV budget's terms, the graphs' measured cost
        self.encoder_outputs: Dict[str, torch.Tensor] = {}  # content hash -> embeddings (multimodal models)

    # --- KV cache -------------------------------------------------------------------
    def num_blocks_that_fit(self) -> int:
        """With TP every rank calls this (a collective): all agree on the smallest rank's count.
        It runs start-up's steps (the memory profile, graphs), so their Triton variants are
        precompiled first."""
        self._precompile_kernels()
        if self.cfg.cache.num_gpu_blocks_override:  # both groups get that many
            self.num_window_blocks = self.cfg.cache.num_gpu_blocks_override if self.kv_spec.num_window_layers else 0
            return self.cfg.cache.num_gpu_blocks_override
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget()
        else:  # the CPU backend: a set size, kv_cache_memory_gib winning over cpu_kvcache_space_gib
            budget = (self.cfg.cache.kv_cache_memory_gib or self.cfg.cache.cpu_kvcache_space_gib) * GiB
        if self.kv_spec.num_window_layers:
            full, window = split_kv_budget(int(budget), self.kv_spec, self.max_model_len,
                                           self.cfg.cache.max_num_batched_tokens)
            self.num_window_blocks = self._agree(window, dist.ReduceOp.MIN)
            return self._agree(full, dist.ReduceOp.MIN)
        return self._agree(int(budget // self.kv_spec.bytes_per_block), dist.ReduceOp.MIN)

    def _gpu_kv_budget(self) -> float:
        """total × gpu_memory_utilization − weights − activation peak − CUDA graphs − non-torch.

        The activation peak comes from a forward at max_num_batched_tokens (profile_run); the
        graphs' cost is measured before the KV cache exists, by capturing the largest batch size
        against a one-block cache (cuda_graphs.measure_graph_memory); non-torch memory (CUDA
        context, cuBLAS and NCCL workspaces, loaded kernels) is what the device uses beyond
        torch's allocator. These terms land in `gpu_memory` (metrics.json) and the log."""
        start = time.perf_counter()
        gc.collect()  # an earlier engine in this process may still be garbage holding device memory
        device_memory()  # synchronize and drop the allocator's unused cache
        weights = torch.cuda.memory_allocated()  # parameters and buffers (rotary tables, scales)
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())
        torch.cuda.reset_peak_memory_stats()
        self.profile_run()
        activation = torch.cuda.max_memory_allocated() - weights
        graphs = {"bytes": 0}
        if self.graph_sizes:
            self._allocate_kv_cache(1)
            graphs = measure_graph_memory(self._new_graphs)
            self._free_kv_cache()
        mem = device_memory()
        total = torch.cuda.mem_get_info()[1]
        util = self.cfg.cache.gpu_memory_utilization
        taken = weights + activation + graphs["bytes"] + mem["non_torch"]
        budget = total * util - taken
        requested = self.cfg.cache.kv_cache_memory_gib
        if requested is not None:  # an exact size instead of a share of the device
            if requested * GiB > total - taken:
                raise ConfigError("cache.kv_cache_memory_gib", requested,
                                  f"this GPU has {(total - taken) / GiB:.2f} GiB left after weights, activations, "
                                  "CUDA graphs and the CUDA context; lower it (task=plan shows the terms)")
            budget = requested * GiB
        self.gpu_memory = {
            "total_bytes": total, "gpu_memory_utilization": util, "kv_cache_memory_gib": requested,
            "model_bytes": weights,
            "model_buffer_bytes": weights - params,
            "activation_peak_bytes": activation, "cudagraph_estimate_bytes": graphs["bytes"],
            "non_torch_bytes": mem["non_torch"], "kv_budget_bytes": int(max(0.0, budget)),
            "profile_seconds": round(time.perf_counter() - start, 3),
        }
        log.info("GPU memory: %.2f GiB%s; weights %.2f (+ buffers %.2f), activation peak %.2f, CUDA graphs %.2f, "
                 "non-torch %.2f; %s %.2f GiB", total / GiB,
                 "" if requested else f" x {util:.2f} = {total * util / GiB:.2f} GiB", params / GiB,
                 (weights - params) / GiB, activation / GiB, graphs["bytes"] / GiB, mem["non_torch"] / GiB,
                 "the KV cache (cache.kv_cache_memory_gib)" if requested else "left for the KV cache",
                 budget / GiB)
        return max(0.0, budget)

    def profile_run(self) -> None:
        """The largest step: max_num_batched_tokens tokens of one sequence, scoring the last
        max_num_seqs rows (the logits of a full eager decode batch), against a one-block cache
        that every block-table entry names; slots are -1, so nothing is stored."""
        n = self.cfg.cache.max_num_batched_tokens
        rows = min(n, self.max_num_seqs)
        self._allocate_kv_cache(1)
        held = self._profile_encoder()  # the encoder's peak, then its outputs held during the decoder's step
        step = StepInput(input_ids=[0] * n, positions=[i % self.max_model_len for i in range(n)],
                         slot_mapping=[-1] * n, cu_seqlens_q=[0, n], seq_lens=[n],
                         block_tables=[[0] * -(-n // self.cfg.cache.block_size)],
                         logits_indices=list(range(n - rows, n)), decode_only=False)
        self.execute(step, keep_on_device=True)
        del held
        if self.device.type == "cuda":
            self._warm_up_small_batches()
        self._free_kv_cache()

    @torch.inference_mode()
    def _profile_encoder(self) -> List[torch.Tensor]:
        """A multimodal model encodes one item of the whole encoder budget (the most a step
        encodes), and its outputs stay, as the encoder cache would hold them: the KV cache is
        sized after both."""
        if not self.encoder_budget_tokens:
            return []
        return self.model.embed_multimodal([self.model.dummy_multimodal_input(self.encoder_budget_tokens)])

    def _warm_up_small_batches(self) -> None:
        """An eager decode step of each batch size up to 8, then mixed steps (a prompt chunk beside
        decodes) of an odd and of a 16-multiple token count: Triton compiles variants by shape (the
        GEMVs at one row, quant_matmul's row tile, decode attention's split count, integer
        arguments that are 1, multiples of 16 or neither), and it should do so now, not inside the
        first requests (profile_run has run the largest step). On a fresh machine (empty Triton
        cache) a first 256-request run missing one such variant ran at 90% of the warm run's speed."""
        for b in range(1, 9):
            step = StepInput(input_ids=[0] * b, positions=[0] * b, slot_mapping=[-1] * b,
                             cu_seqlens_q=list(range(b + 1)), seq_lens=[1] * b, block_tables=[[0]] * b,
                             logits_indices=list(range(b)), decode_only=True)
            self.execute(step, keep_on_device=True)
        # A short prompt alone: its block table is 1 wide, a stride Triton specializes the prefill
        # kernel on (a server's first request is often such; it compiled at that request before).
        step = StepInput(input_ids=[0] * 5, positions=list(range(5)), slot_mapping=[-1] * 5, cu_seqlens_q=[0, 5],
                         seq_lens=[5], block_tables=[[0]], logits_indices=[4], decode_only=False)
        self.execute(step, keep_on_device=True)
        # Block tables 3 wide: Triton also specializes on the table's row stride (1, a multiple of
        # 16, or neither), and a real mixed step's width is usually neither.
        for chunk in (6, 15):  # + one decode row: 7 and 16 tokens
            n = chunk + 1
            step = StepInput(input_ids=[0] * n, positions=list(range(chunk)) + [0], slot_mapping=[-1] * n,
                             cu_seqlens_q=[0, chunk, n], seq_lens=[chunk, 1], block_tables=[[0, 0, 0], [0]],
                             logits_indices=[chunk - 1, chunk], decode_only=False)
            self.execute(step, keep_on_device=True)

    def _precompile_kernels(self) -> None:
        """Start-up's steps (the memory profile, the small-batch warm-up, one eager step of every
        graph size) launch each Triton variant the engine needs, and the first launch of each
        compiles it, one after another. Run those steps once with Triton's launches skipped, only
        noting the variants, and compile them all at once in worker processes
        (kernels/precompile.py); start-up then runs as before, with every variant on disk."""
        precompiler, self.precompiler = self.precompiler, None
        if precompiler is None:
            return
        start = time.perf_counter()
        try:
            with precompiler.record():
                self.profile_run()
                if self.graph_sizes:
                    self._allocate_kv_cache(1)
                    graphs = self._new_graphs()
                    graphs.run_eagerly()
                    graphs.release()
                    self._free_kv_cache()
        except Exception:  # only a speed-up: start-up goes on as without it, each variant compiled at its launch
            log.warning("Triton precompilation stopped; kernel variants compile at their first launch", exc_info=True)
            precompiler.close()
            self._free_kv_cache()
            return
        recorded = time.perf_counter() - start
        report = precompiler.compile()
        self.precompile_stats = {"precompile_seconds": round(time.perf_counter() - start, 3),
                                 "precompile_record_seconds": round(recorded, 3),
                                 "precompile_variants": report.variants, "precompile_workers": report.workers,
                                 "precompile_failed": len(report.failed),
                                 "precompile_compiled_here": report.compiled_here}
        log.info("Triton: %d kernel variants noted in %.2f s and compiled by %d processes meanwhile; %.2f s more "
                 "until all were loaded (%d not found on disk, compiled here)", report.variants, recorded,
                 report.workers, report.seconds, report.compiled_here)
        for failure in report.failed:
            log.warning("Triton variant not precompiled (it compiles at its first launch): %s", failure)

    def allocate_kv_cache(self, num_blocks: Optional[int], num_window_blocks: Optional[int] = None) -> None:
        """With TP every rank calls this (a collective): rank 0's counts, after the engine's caps,
        are broadcast, so other ranks pass None and hold exactly the blocks rank 0 schedules."""
        num_blocks = self._agree(num_blocks or 0, None)
        num_window_blocks = self._agree(num_window_blocks or 0, None)
        self.num_blocks, self.num_window_blocks = num_blocks, num_window_blocks
        self._allocate_kv_cache(num_blocks, num_window_blocks)
        if self.graph_sizes:  # after the cache: the graphs point at it
            self._capture_graphs()

    def _allocate_kv_cache(self, num_blocks: int, num_window_blocks: Optional[int] = None) -> None:
        """Window-group layers get `num_window_blocks` (default: as many as the others)."""
        s = self.kv_spec
        for layer in self.attn_layers:
            windowed = s.num_window_layers and layer.spec.sliding_window
            n = num_window_blocks if windowed and num_window_blocks is not None else num_blocks
            shape = (n, s.num_kv_heads, s.block_size, s.head_dim)  # the layout of kernels/kv_cache.py
            layer.k_cache = torch.zeros(shape, dtype=s.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=s.dtype, device=self.device)

    def _agree(self, value: int, op: Optional[dist.ReduceOp]) -> int:
        """One integer agreed across ranks: reduced with `op`, or rank 0's when op is None."""
        if self.tp.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if op is None:
            dist.broadcast(t, src=0)
        else:
            dist.all_reduce(t, op=op)
        return int(t.item())

    def _free_kv_cache(self) -> None:
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- GPU: compilation and CUDA graphs ----------------------------------------------
    def _compile_forward(self):
        """compilation.level >= 1 (GPU): torch.compile(dynamic=True) of the model's forward, split
        at attention. Each Attention call (KV store and paged attention, whose launch shapes are
        Python-side choices) runs eagerly between compiled pieces, like vLLM's piecewise mode;
        CUDA graphs, when on, then capture the compiled pieces and the attention calls alike."""
        if self.compilation_level == CompilationLevel.NO_COMPILATION or self.device.type != "cuda":
            return self.model
        for layer in self.attn_layers:
            layer.forward = torch.compiler.disable(layer.forward)
        return torch.compile(self.model, dynamic=True)

    def _graph_sizes(self) -> List[int]:
        if self.device.type != "cuda" or self.cfg.compilation.enforce_eager:
            return []
        return list(self.cfg.compilation.cudagraph_capture_sizes)  # resolved for max_num_seqs

    def _new_graphs(self) -> CudaGraphRunner:
        return CudaGraphRunner(self.forward, self.model.compute_logits, self.graph_sizes, self.max_model_len,
                               self.cfg.cache.block_size, self.device,
                               self.sampled if self.async_scheduling else None,
                               windowed=bool(self.kv_spec.num_window_layers))

    def _capture_graphs(self) -> None:
        before = device_memory()
        self.graphs = self._new_graphs()
        self.graphs.capture()
        after = device_memory()
        used, estimate = after["used"] - before["used"], self.gpu_memory.get("cudagraph_estimate_bytes")
        self.gpu_memory.update(cudagraph_bytes=used, cudagraph_pool_bytes=after["reserved"] - before["reserved"],
                               cudagraph_capture_seconds=round(self.graphs.capture_seconds, 3))
        log.info("CUDA graphs: %d decode batch sizes (%d..%d) captured in %.2f s; they take %.3f GiB "
                 "(estimated %s before the KV cache)", len(self.graph_sizes), self.graph_sizes[0],
                 self.graph_sizes[-1], self.graphs.capture_seconds, used / GiB,
                 "n/a" if estimate is None else f"{estimate / GiB:.3f} GiB")
        if estimate is not None and used > estimate + 64 * (1 << 20):
            log.warning("CUDA graphs took %.3f GiB more than estimated; gpu_memory_utilization may be "
                        "exceeded by that much", (used - estimate) / GiB)

    def gpu_stats(self) -> Dict[str, Any]:
        """For metrics.json: compilation, graphs, and the KV budget's terms (GPU only)."""
        if self.device.type != "cuda":
            return {}
        stats: Dict[str, Any] = {"compilation_level": self.compilation_level.name,
                                 "cudagraph_sizes": self.graph_sizes, **self.precompile_stats, **self.gpu_memory}
        if "kv_budget_bytes" in self.gpu_memory:
            m = self.gpu_memory
            per_token = self.kv_spec.bytes_per_block / self.kv_spec.block_size
            stats["kv_bytes_per_token"] = int(per_token)
            stats["kv_tokens_formula"] = int(m["kv_budget_bytes"] // per_token)  # before block rounding and caps
            params = m["model_bytes"] - m["model_buffer_bytes"]  # the bound: only the weights take memory
            stats["kv_tokens_weights_only"] = int((m["total_bytes"] * m["gpu_memory_utilization"] - params)
                                                  // per_token)
        return stats

    def kv_shortfall(self, tokens: int, max_model_len: int) -> str:
        """The error when the KV cache (`tokens` tokens) cannot hold one request of max_model_len:
        the largest max_model_len that fits, and overrides that would make room."""
        c, bs = self.cfg.cache, self.kv_spec.block_size
        per_token = self.kv_spec.bytes_per_block / bs
        missing = (-(-max_model_len // bs) * bs - tokens) * per_token
        text = f"the KV cache holds {tokens} tokens, less than one request of cache.max_model_len={max_model_len}"
        if tokens > 0:
            text += f"; the largest cache.max_model_len that fits is {tokens}"
        fixes = []
        if c.num_gpu_blocks_override:
            fixes.append(f"cache.num_gpu_blocks_override={-(-max_model_len // bs)}")
        elif c.kv_cache_memory_gib is not None:
            fixes.append(f"cache.kv_cache_memory_gib={math.ceil((c.kv_cache_memory_gib + missing / GiB) * 100) / 100}")
        elif self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            util = math.ceil((c.gpu_memory_utilization + missing / total) * 100) / 100
            if util <= 1:
                fixes.append(f"cache.gpu_memory_utilization={util:.2f}")
            graphs = self.gpu_memory.get("cudagraph_estimate_bytes", 0)
            if graphs:
                fixes.append(f"compilation.enforce_eager=true (frees {graphs / GiB:.2f} GiB of CUDA graphs)")
            if c.max_num_batched_tokens > 512:
                fixes.append(f"cache.max_num_batched_tokens={max(512, c.max_num_batched_tokens // 4)} "
                             f"(activation peak now {self.gpu_memory.get('activation_peak_bytes', 0) / GiB:.2f} GiB)")
        else:
            fixes.append(f"cache.cpu_kvcache_space_gib={math.ceil((c.cpu_kvcache_space_gib + missing / GiB) * 100) / 100}")
        if c.kv_cache_dtype == "auto" and self.kv_spec.dtype.itemsize > 1:
            fixes.append("cache.kv_cache_dtype=fp8 (half the KV bytes)")
        if self.cfg.quantization.method == "none":
            fixes.append("quantization=fp8 (about half the weight bytes)")
        if self.device.type == "cuda":
            fixes.append(f"parallelism.tensor_parallel_size={2 * self.tp.size} (on more GPUs)")
        return text + "; or make room: " + ", ".join(fixes)

    # --- steps ----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput, keep_on_device: bool = False) -> Optional[torch.Tensor]:
        """Forward one step; returns float32 logits [len(logits_indices), vocab] on rank 0, on the
        CPU, or where the model runs with keep_on_device (the engine samples there); None on the
        other ranks, and for a step whose greedy rows go to `sampled` (step.greedy_rows).

        A pure-decode step that scores every row replays a CUDA graph when one covers its batch."""
        graphs = self.graphs
        self.last_graphed = (graphs is not None and step.decode_only and step.num_seqs <= graphs.max_batch
                             and len(step.logits_indices) == step.num_seqs)
        if self.last_graphed:
            logits = graphs.replay(step)
        else:
            t = self.staging.stage(step)
            meta = AttentionMetadata(slot_mapping=t.slot_mapping, cu_seqlens_q=t.cu_seqlens_q, seq_lens=t.seq_lens,
                                     block_tables=t.block_tables, decode_only=step.decode_only,
                                     max_seq_len=max(step.seq_lens), window_slot_mapping=t.window_slot_mapping,
                                     window_block_tables=t.window_block_tables)
            input_ids = fill_sampled(t.input_ids, self.sampled) if self.async_scheduling else t.input_ids
            if step.causal_limits:  # a step with a bidirectional image run: its own small copy
                meta.causal_limits = torch.tensor(step.causal_limits, dtype=torch.int32, device=self.device)
            positions, inputs_embeds = t.positions, self._multimodal_embeds(step, input_ids)
            if step.mrope_positions is not None:
                positions = torch.tensor(step.mrope_positions, dtype=torch.int64, device=self.device)
            if inputs_embeds is None:
                hidden = self.forward(input_ids, positions, meta)
            else:
                hidden = self.forward(input_ids, positions, meta, inputs_embeds=inputs_embeds)
            logits = self.model.compute_logits(hidden.index_select(0, t.logits_indices))
        if step.greedy_rows:
            if not self.last_graphed:  # a graph took its argmax already
                greedy = self.sampled[:step.greedy_rows]
                if logits.is_cuda:
                    argmax_rows(logits, out=greedy)
                else:
                    torch.argmax(logits, dim=-1, out=greedy)
            return None  # the engine reads `sampled`; no float32 copy of the logits is made
        if self.tp.rank != 0:
            return None
        return logits.float() if keep_on_device else logits.float().cpu()

    def _multimodal_embeds(self, step: StepInput, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Token embeddings with encoder outputs in the placeholder rows, or None for a text step.
        Items to encode run through the model's encoder now (every rank: the tower is
        replicated); their outputs stay until the scheduler's encoder cache evicts them."""
        for key in step.mm_evict:
            self.encoder_outputs.pop(key, None)
        if step.mm_encode:
            outputs = self.model.embed_multimodal([(modality, data) for _, modality, data in step.mm_encode])
            for (key, _, _), out in zip(step.mm_encode, outputs):
                self.encoder_outputs[key] = out
        if not step.mm_spans:
            return None
        embeds = self.model.embed_input_ids(input_ids)
        for row, key, first, count in step.mm_spans:
            embeds[row:row + count] = self.encoder_outputs[key][first:first + count].to(embeds.dtype)
        return embeds

    def run(self, step: StepInput, keep_on_device: bool = False) -> Optional[torch.Tensor]:
        if self.tp.size > 1:
            dist.broadcast_object_list([step], src=0, group=step_group())
        return self.execute(step, keep_on_device)

    # --- ranks other than 0 ------------------------------------------------------------
    def serve_forever(self) -> None:
        """Follow rank 0's steps until it broadcasts None."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=step_group())
            if box[0] is None:
                return
            self.execute(box[0])

    def stop_workers(self) -> None:
        if self.tp.size > 1 and self.tp.rank == 0:
            dist.broadcast_object_list([None], src=0, group=step_group())

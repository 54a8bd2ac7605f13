"""Runs the model on one rank: builds it, loads weights, owns the KV cache, executes steps.

Rank 0 hands each StepInput to `run`; with tensor parallelism it first broadcasts the step
to the other ranks, which wait in `serve_forever` (no Ray call per step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from framework.config.schema import FrameworkConfig
from framework.engine.step_input import StepInput
from framework.layers.attention import Attention, AttentionMetadata
from framework.layers.quantization import get_quant_method
from framework.loader import load_weights
from framework.loader.weights import LoadStats
from framework.models.registry import model_class
from framework.parallel import tp_rank, tp_size

GiB = 1 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, hf_config: Any) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slow and less exact
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = DTYPES.get(str(ckpt).replace("torch.", ""), torch.bfloat16)
    return torch.bfloat16 if ckpt == torch.float32 else ckpt


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return torch.float8_e4m3fn if name == "fp8" else model_dtype


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


class ModelRunner:
    def __init__(self, cfg: FrameworkConfig, model_path: Path, hf_config: Any, max_model_len: int):
        self.cfg = cfg
        self.device = pick_device(cfg.model.device)
        self.dtype = pick_dtype(cfg.model.dtype, self.device, hf_config)
        if self.device.type == "cuda":
            # Ray shows each rank actor only its own GPU, so rank r may see just cuda:0
            index = self.device.index if self.device.index is not None else tp_rank() % torch.cuda.device_count()
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(cfg.model.seed)

        start = time.perf_counter()
        # quantization.method: the linear layers' storage, built (and checked) before any weight is read
        method = get_quant_method(cfg.quantization, hf_config)
        quant = {"quant_method": method} if method is not None else {}
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf_config)(hf_config, max_model_len, **quant).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        self.load_stats: LoadStats = load_weights(self.model, cfg.model, model_path, cfg.quantization.method)
        self.load_seconds = time.perf_counter() - start

        self.attn_layers: List[Attention] = [m for m in self.model.modules() if isinstance(m, Attention)]
        first = self.attn_layers[0]
        self.kv_spec = KVCacheSpec(len(self.attn_layers), first.num_kv_heads, first.head_dim,
                                   cfg.cache.block_size, kv_cache_dtype(cfg.cache.kv_cache_dtype, self.dtype))
        self.num_blocks = 0

    # --- KV cache -------------------------------------------------------------------
    def num_blocks_that_fit(self) -> int:
        """With TP every rank calls this (a collective): all agree on the smallest rank's count."""
        if self.cfg.cache.num_gpu_blocks_override:
            return self.cfg.cache.num_gpu_blocks_override
        budget = self.cfg.cache.cpu_kvcache_space_gib * GiB
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget()
        return self._agree(int(budget // self.kv_spec.bytes_per_block), dist.ReduceOp.MIN)

    def _gpu_kv_budget(self) -> float:
        """total × utilization − what is in use after a profiling forward at the largest step."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.profile_run()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_allocated()
        return total * self.cfg.cache.gpu_memory_utilization - used_by_others - peak

    def profile_run(self) -> None:
        """A forward over max_num_batched_tokens tokens with no KV cache writes (slots -1)."""
        n = self.cfg.cache.max_num_batched_tokens
        self._allocate_kv_cache(1)
        step = StepInput(input_ids=[0] * n, positions=list(range(n)), slot_mapping=[-1] * n,
                         cu_seqlens_q=[0, n], seq_lens=[n], block_tables=[[0]], logits_indices=[n - 1],
                         decode_only=False)
        self.execute(step)
        self._free_kv_cache()

    def allocate_kv_cache(self, num_blocks: Optional[int]) -> None:
        """With TP every rank calls this (a collective): rank 0's count, after the engine's caps,
        is broadcast, so other ranks pass None and hold exactly the blocks rank 0 schedules."""
        num_blocks = self._agree(num_blocks or 0, None)
        self.num_blocks = num_blocks
        self._allocate_kv_cache(num_blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        s = self.kv_spec
        shape = (num_blocks, s.block_size, s.num_kv_heads, s.head_dim)
        for layer in self.attn_layers:
            layer.k_cache = torch.zeros(shape, dtype=s.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=s.dtype, device=self.device)

    def _agree(self, value: int, op: Optional[dist.ReduceOp]) -> int:
        """One integer agreed across ranks: reduced with `op`, or rank 0's when op is None."""
        if tp_size() == 1:
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

    # --- steps ----------------------------------------------------------------------
    def _tensors(self, step: StepInput):
        dev, i32 = self.device, torch.int32
        width = max(len(t) for t in step.block_tables)
        tables = [t + [0] * (width - len(t)) for t in step.block_tables]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slot_mapping, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(step.cu_seqlens_q, dtype=i32, device=dev),
            seq_lens=torch.tensor(step.seq_lens, dtype=i32, device=dev),
            block_tables=torch.tensor(tables, dtype=i32, device=dev),
            decode_only=step.decode_only, max_seq_len=max(step.seq_lens))
        ids = torch.tensor(step.input_ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(step.positions, dtype=torch.int64, device=dev)
        return ids, positions, meta

    @torch.inference_mode()
    def execute(self, step: StepInput) -> Optional[torch.Tensor]:
        """Forward one step; returns float32 logits [len(logits_indices), vocab] on rank 0."""
        ids, positions, meta = self._tensors(step)
        hidden = self.model(ids, positions, meta)
        index = torch.tensor(step.logits_indices, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, index))
        return logits.float().cpu() if tp_rank() == 0 else None

    def run(self, step: StepInput) -> Optional[torch.Tensor]:
        if tp_size() > 1:
            dist.broadcast_object_list([step], src=0)
        return self.execute(step)

    # --- ranks other than 0 ------------------------------------------------------------
    def serve_forever(self) -> None:
        """Follow rank 0's steps until it broadcasts None."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            self.execute(box[0])

    def stop_workers(self) -> None:
        if tp_size() > 1 and tp_rank() == 0:
            dist.broadcast_object_list([None], src=0)

"""One tensor-parallel rank inside a Ray actor: join the process group, build this rank's part, serve.

Rank 0 holds the engine (scheduler, sampler, tokenizer) and drives every step; the other ranks
hold a ModelRunner and follow rank 0's broadcasts in `serve`. Ray only starts and stops ranks:
each step travels over torch.distributed, never through a Ray call.
"""
from __future__ import annotations

import functools
import os
import socket
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from framework.config.errors import ConfigError, UserError
from framework.config.schema import FrameworkConfig
from framework.engine.build import build_engine
from framework.engine.model_runner import ModelRunner
from framework.engine.outputs import RequestOutput
from framework.loader.sharded import save_rank
from framework.memory.measure import rank_stats
from framework.parallel import ParallelInfo, set_step_group
from launchers.remote_engine import EngineHost, MultimodalLimits, StepReport

# Generous: rank 0 may still be importing torch or reading its weights when the others arrive.
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


def on_own_gpu(method: Callable) -> Callable:
    """Ray runs an actor's calls on a pool of threads, and CUDA's current device is per thread:
    each call that reaches the GPU first makes this rank's GPU current (all of its node's GPUs
    are visible to it, _see_node_gpus)."""
    @functools.wraps(method)
    def on_gpu(self, *args, **kwargs):
        if self.gpu_index is not None:
            torch.cuda.set_device(self.gpu_index)
        return method(self, *args, **kwargs)
    return on_gpu


class RankActor:
    """Made as soon as the ranks' resources are reserved, so its process starts and imports while
    the driver still checks and plans the config; `start` brings the config and builds the rank."""

    def __init__(self, rank: int, world_size: int, num_cpus_per_rank: float):
        self.rank, self.world_size = rank, world_size
        self.cfg: Optional[FrameworkConfig] = None
        self.engine = None
        self.runner = None
        self.gpu_index: Optional[int] = None  # this rank's GPU among those it sees (None: a CPU rank)
        if num_cpus_per_rank == 0:
            # Ray pins an actor holding no CPUs to one thread; ranks sharing a node share its cores instead.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))

    def hello(self) -> Tuple[int, str, List[str]]:
        """This rank's process id, node address and Ray's GPU ids for it; answering at all means
        the actor is up."""
        import ray
        return os.getpid(), ray.util.get_node_ip_address(), [str(i) for i in ray.get_gpu_ids()]

    def free_port(self) -> int:
        """A port free on this node right now. Picked per run (bind to 0), so two engines on one
        host never collide; the tiny window before torch binds it again is the usual trade-off."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, cfg: FrameworkConfig, model_path: Path, hf_config: Any, address: str, port: int, backend: str,
              weights_only: bool, node_gpus: Dict[str, List[str]]) -> None:
        """Join the group, then build: every rank loads only its slices, all ranks concurrently."""
        self.cfg, self.model_path, self.hf_config = cfg, model_path, hf_config
        # Peer memory joins the GPUs of one host: ranks over several nodes all-reduce through NCCL
        self.one_host = len(node_gpus) == 1
        if cfg.parallelism.custom_all_reduce and self.one_host:
            self._see_node_gpus(node_gpus)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=RENDEZVOUS_TIMEOUT)
        if backend == "nccl":  # step objects travel over a CPU group (framework/parallel.py)
            set_step_group(dist.new_group(backend="gloo"))
        try:
            self._build(weights_only)
        except ConfigError as exc:  # its (key, value, expected) signature does not survive pickling
            raise UserError(str(exc)) from None

    def _see_node_gpus(self, node_gpus: Dict[str, List[str]]) -> None:
        """Ray shows an actor only its own GPU. Peer-memory all-reduce (framework/symm_all_reduce.py)
        maps its peers' buffers by device, so every rank is shown all of its node's ranks' GPUs,
        in one order, and takes its own as the current device before CUDA starts."""
        import ray
        own = [str(i) for i in ray.get_gpu_ids()]
        if len(own) != 1 or torch.cuda.is_initialized():  # a CPU rank; or CUDA read the variable already
            return
        ids = node_gpus[ray.util.get_node_ip_address()]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        self.gpu_index = ids.index(own[0])
        torch.cuda.set_device(self.gpu_index)

    def _build(self, weights_only: bool) -> None:
        """The config arrives resolved (the driver resolved every `auto` once)."""
        runner = ModelRunner(self.cfg, self.model_path, self.hf_config,
                             ParallelInfo(self.rank, self.world_size, one_host=self.one_host))
        if weights_only:  # task=save_sharded: no KV cache, no engine
            self.runner = runner
        elif self.rank == 0:
            self.engine = build_engine(self.cfg, self.model_path, self.hf_config, runner)
            self.runner = runner
        else:
            self.runner = runner
            # The same two collectives rank 0's engine makes: agree the block count, then allocate.
            self.runner.num_blocks_that_fit()
            self.runner.allocate_kv_cache(None)

    # --- rank 0 -------------------------------------------------------------------------
    @on_own_gpu
    def generate(self, prompts: List[Any], params: Any, progress: bool) -> List[RequestOutput]:
        return self.engine.generate(prompts, params, progress)

    @on_own_gpu
    def score(self, windows: List[List[int]]) -> List[float]:
        return self.engine.score(windows)

    @on_own_gpu
    def stop_workers(self) -> None:
        self.runner.stop_workers()

    # rank 0, serving: the driver's RemoteEngine (launchers/remote_engine.py) calls these
    @on_own_gpu
    def serve_info(self) -> Dict[str, Any]:
        self.host = EngineHost(self.engine)
        mm = self.engine.mm_processor
        return {"max_model_len": self.engine.max_model_len, "vocab_size": self.engine.vocab_size,
                "gauges": self.engine.gauges(),
                "mm_limits": None if mm is None else MultimodalLimits(mm.limits, mm.language_model_only)}

    @on_own_gpu
    def serve_add(self, prompt: Any, params: List[Any]) -> List[Any]:
        return self.host.add(prompt, params)

    @on_own_gpu
    def serve_abort(self, seq_id: int) -> None:
        self.host.abort(seq_id)

    @on_own_gpu
    def serve_step(self) -> StepReport:
        return self.host.step()

    # --- other ranks --------------------------------------------------------------------
    @on_own_gpu
    def serve(self) -> None:
        self.runner.serve_forever()

    # --- every rank ---------------------------------------------------------------------
    @on_own_gpu
    def stats(self) -> Dict[str, Any]:
        # Only rank 0 has a scheduler; the other ranks report their runner's figures.
        engine = self.engine or SimpleNamespace(runner=self.runner, scheduler=SimpleNamespace(num_preemptions=0))
        stats = {"rank": self.rank, "pid": os.getpid(), **rank_stats(engine)}
        if self.engine is None:
            stats.pop("num_preemptions")
        return stats

    @on_own_gpu
    def save_shard(self, folder: str) -> Dict[str, Any]:
        return save_rank(self.runner.model, Path(folder), self.rank)

    @on_own_gpu
    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

"""Tensor parallelism on Ray: one actor per rank in a placement group, torch.distributed between them.

The driver makes one Ray call per `generate`; inside it rank 0's engine drives every step and
broadcasts it to the other ranks over torch.distributed (gloo on CPU, NCCL on GPU). While it
waits, the driver watches every rank: a rank that dies or raises ends the run within seconds
with one error, and every actor of the run is killed. Actors and the placement group are
released at `shutdown`, so a multirun can start many launchers in one process.

One machine: nothing to set up. `launcher.address=null` starts a private Ray instance for the
run (and stops it at shutdown); a Ray already initialized in this process is used as it is.

Several machines: start Ray on each with the same Python environment and this code installed,
and the model folder at the same path on every node (shared storage, or copied), then name
the cluster:

    ray start --head --port=6379                 # on the head node
    ray start --address=HEAD_IP:6379             # on every other node
    python -m framework.run launcher=ray launcher.address=auto \\
        parallelism.tensor_parallel_size=16 model.path=/shared/models/Llama-3.1-70B-Instruct

Bundles are packed onto as few nodes as possible (`PACK`); rank 0's node hosts the rendezvous
on a port picked for each run, so its nodes must reach each other on ephemeral ports. With
`model.load_format=sharded` each node needs only its own ranks' files.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from framework.config.errors import ConfigError, UserError
from framework.config.schema import FrameworkConfig
from framework.engine.outputs import RequestOutput
from launchers.base import Launcher
from launchers.rank import RankActor
from launchers.remote_engine import RemoteEngine

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a wait looks up from its result (Ctrl-C stays responsive)
GRACE_S = 2.0  # after a first failure, how long the other ranks get to report theirs
STOP_S = 10.0  # how long a clean stop may take before the actors are killed anyway
RESERVE_S = 60.0  # how long the placement group may wait for resources others hold
TOKEN_CPU = 0.01  # Ray rejects an empty bundle: with num_cpus_per_rank=0 a CPU rank reserves this


class RankFailure(RuntimeError):
    """A rank died or raised: the run is over and every rank of it was stopped."""


def connect(address: Optional[str]) -> bool:
    """Join `launcher.address`'s cluster, or start a private one. True when this call connected,
    so this launcher disconnects (and stops a private instance) at shutdown."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return True


def uses_gpu(cfg: FrameworkConfig) -> bool:
    # The driver may have no GPU of its own (a CPU head node): ask the cluster, not torch.
    if cfg.model.device != "auto":
        return cfg.model.device == "cuda"
    return ray.cluster_resources().get("GPU", 0) > 0


def check_room(cfg: FrameworkConfig, gpu: bool) -> None:
    """More ranks than the cluster holds is an error now, before any actor starts or weight is read.
    A GPU rank needs one GPU; a CPU rank one CPU (or launcher.num_cpus_per_rank, if larger)."""
    tp, have = cfg.parallelism.tensor_parallel_size, ray.cluster_resources()
    per_rank = cfg.launcher.num_cpus_per_rank if gpu else max(cfg.launcher.num_cpus_per_rank, 1.0)
    gpus, cpus = int(have.get("GPU", 0)), have.get("CPU", 0.0)
    if gpu and tp > gpus:
        raise ConfigError("parallelism.tensor_parallel_size", tp,
                          f"needs {tp} GPUs (one per rank) but the Ray cluster has {gpus}; lower it, add GPU "
                          "nodes (launcher.address), or run on CPU with model.device=cpu")
    if tp * per_rank > cpus:
        raise ConfigError("parallelism.tensor_parallel_size", tp,
                          f"needs {tp * per_rank:g} CPUs ({per_rank:g} per rank, launcher.num_cpus_per_rank="
                          f"{cfg.launcher.num_cpus_per_rank:g}) but the Ray cluster has {cpus:g}; lower it or "
                          "join a bigger cluster with launcher.address")


def bundles(cfg: FrameworkConfig, gpu: bool) -> List[Dict[str, float]]:
    bundle: Dict[str, float] = {"GPU": 1.0} if gpu else {}
    if cfg.launcher.num_cpus_per_rank > 0:
        bundle["CPU"] = float(cfg.launcher.num_cpus_per_rank)
    elif not gpu:
        bundle["CPU"] = TOKEN_CPU
    return [dict(bundle) for _ in range(cfg.parallelism.tensor_parallel_size)]


class RayLauncher(Launcher):
    """The Launcher interface over Ray actors. `weights_only` builds each rank's model without engine or
    KV cache (task=save_sharded)."""

    def __init__(self, cfg: FrameworkConfig, model_path: Optional[Path] = None, hf_config: Any = None,
                 weights_only: bool = False):
        """Reserve the ranks' resources and start their actors, then, given a model, build the
        ranks. Without one the actors are only started (they import meanwhile): `build` follows,
        as LLM does once the config is checked and resolved (`cfg` need only be the requested one)."""
        self.cfg, self.tp = cfg, cfg.parallelism.tensor_parallel_size
        self.actors: List[Any] = []
        self.pids: List[int] = []
        self.serving: Dict[Any, int] = {}  # ranks > 0 in serve_forever: ref -> rank
        self.pg = None
        self.busy = False  # a call is in flight (or was cut short)
        self.owns_ray = connect(cfg.launcher.address)
        try:
            self.gpu = uses_gpu(cfg)
            check_room(cfg, self.gpu)
            self.pg = self._reserve(bundles(cfg, self.gpu))
            self._spawn()
        except BaseException:
            self._release()
            raise
        if model_path is not None:
            self.build(cfg, model_path, hf_config, weights_only)

    def build(self, cfg: FrameworkConfig, model_path: Path, hf_config: Any, weights_only: bool = False) -> "RayLauncher":
        """`cfg` resolved: every rank gets the same values."""
        self.cfg = cfg
        try:
            self._start(model_path, hf_config, "nccl" if self.gpu else "gloo", weights_only)
        except BaseException:
            self._release()
            raise
        return self

    # --- start-up -----------------------------------------------------------------------
    def _reserve(self, wanted: List[Dict[str, float]]) -> Any:
        pg = placement_group(wanted, strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=RESERVE_S)
        if not ready:
            remove_placement_group(pg)
            raise UserError(f"could not reserve {len(wanted)} x {wanted[0]} for the ranks within {RESERVE_S:g} s; "
                            f"the Ray cluster has free {ray.available_resources()}")
        return pg

    def _spawn(self) -> None:
        actor_cls = ray.remote(RankActor)
        cpus = self.cfg.launcher.num_cpus_per_rank
        for rank in range(self.tp):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
            # max_concurrency=2: a rank in serve_forever still answers stats() and close()
            self.actors.append(actor_cls.options(
                num_cpus=cpus, num_gpus=1 if self.gpu else 0, max_concurrency=2,
                scheduling_strategy=strategy).remote(rank, self.tp, cpus))

    def _start(self, model_path: Path, hf_config: Any, backend: str, weights_only: bool) -> None:
        hello = self._wait(self._on_all("hello"))
        self.pids = [pid for pid, _, _ in hello]
        # Each node's GPUs held by our ranks: every rank on a node is shown all of them (rank.py)
        node_gpus: Dict[str, List[str]] = {}
        for _, node, gpus in hello:
            node_gpus.setdefault(node, []).extend(gpus)
        node_gpus = {node: sorted(ids, key=lambda i: (len(i), i)) for node, ids in node_gpus.items()}
        port = self._wait({self.actors[0].free_port.remote(): 0})[0]
        self._wait(self._on_all("start", self.cfg, model_path, hf_config, hello[0][1], port, backend, weights_only,
                                node_gpus))
        if not weights_only:
            self.serving = {a.serve.remote(): rank for rank, a in enumerate(self.actors) if rank > 0}

    # --- the launcher interface ---------------------------------------------------------
    def generate(self, prompts: List[Any], params: Any, progress: bool) -> List[RequestOutput]:
        self._check_running()
        return self._wait({self.actors[0].generate.remote(prompts, params, progress): 0})[0]

    def score(self, windows: List[List[int]]) -> List[float]:
        self._check_running()
        return self._wait({self.actors[0].score.remote(windows): 0})[0]

    def call_rank0(self, method: str, *args: Any) -> Any:
        """One call to rank 0's actor, every rank watched while it runs (a dead rank raises)."""
        self._check_running()
        return self._wait({getattr(self.actors[0], method).remote(*args): 0})[0]

    def serving_engine(self, tokenizer: Any) -> RemoteEngine:
        return RemoteEngine(self.call_rank0, tokenizer, self.call_rank0("serve_info"))

    def stats(self) -> Dict[str, Any]:
        self._check_running()
        return {"ranks": self._wait(self._on_all("stats"))}

    def save_sharded(self, folder: Path) -> List[Dict[str, Any]]:
        """Each rank writes the weights it holds to folder/rank{i}.safetensors."""
        self._check_running()
        return self._wait(self._on_all("save_shard", str(folder)))

    def shutdown(self) -> None:
        """Stop the workers' loops and leave the process group, then kill the actors regardless."""
        try:
            # a call cut short (Ctrl-C) leaves ranks mid-step, and ranks never built have nothing to
            # stop: just kill
            if self.actors and self.pids and not self.busy:
                self._stop_gracefully()
        except Exception as exc:  # the kill below still frees everything
            log.warning("ranks did not stop cleanly (%s); killing them", exc)
        finally:
            self._release()

    def _stop_gracefully(self) -> None:
        serving, self.serving = list(self.serving), {}
        if serving:  # rank 0 broadcasts the stop; the others' serve_forever returns
            stopping = serving + [self.actors[0].stop_workers.remote()]
            ray.wait(stopping, num_returns=len(stopping), timeout=STOP_S)
        closing = [a.close.remote() for a in self.actors]
        ray.wait(closing, num_returns=len(closing), timeout=STOP_S)

    # --- waiting and failing ------------------------------------------------------------
    def _check_running(self) -> None:
        if not self.actors:
            raise RankFailure("the tensor-parallel ranks are stopped (shut down, or a rank failed earlier)")

    def _on_all(self, method: str, *args: Any) -> Dict[Any, int]:
        return {getattr(actor, method).remote(*args): rank for rank, actor in enumerate(self.actors)}

    def _wait(self, calls: Dict[Any, int]) -> List[Any]:
        """The results of `calls` (ref -> rank), in order, watching every rank meanwhile: a call
        that raises, or a serve loop that ends, stops the whole run."""
        results: Dict[Any, Any] = {}
        self.busy = True
        while len(results) < len(calls):
            pending = [ref for ref in calls if ref not in results]
            ready, _ = ray.wait(pending + list(self.serving), num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in self.serving:
                    self._fail({**calls, **self.serving})
                try:
                    results[ref] = ray.get(ref)
                except Exception:
                    self._fail({**calls, **self.serving})
        self.busy = False
        return [results[ref] for ref in calls]

    def _fail(self, watched: Dict[Any, int]) -> NoReturn:
        """Collect every rank's error (briefly), stop all ranks, raise the most telling one."""
        ray.wait(list(watched), num_returns=len(watched), timeout=GRACE_S)
        errors: Dict[int, BaseException] = {}
        for ref, rank in watched.items():
            if not ray.wait([ref], timeout=0)[0]:
                continue
            exc = _error(ref)
            if exc is None and ref in self.serving:
                exc = RuntimeError("its serve loop ended without a stop from rank 0")
            if exc is not None:
                errors.setdefault(rank, exc)
        self._release()
        raise self._explain(errors)

    def _explain(self, errors: Dict[int, BaseException]) -> BaseException:
        causes = {rank: getattr(exc, "cause", exc) for rank, exc in errors.items()}
        user = [c for c in causes.values() if isinstance(c, UserError)]
        if user:  # the same mistake on every rank (e.g. a sharded folder of another TP size): one line
            return user[0]
        died = [rank for rank, exc in errors.items() if isinstance(exc, RayActorError)]
        if died:
            rank = died[0]
            pid = self.pids[rank] if rank < len(self.pids) else "?"
            return RankFailure(f"rank {rank} of {self.tp} (pid {pid}) died: its process exited unexpectedly "
                               "(killed, out of memory, or crashed; see its log above); all ranks of this run "
                               "were stopped")
        if not errors:
            return RankFailure("a rank failed without an error; all ranks of this run were stopped")
        rank = min(errors)
        cause = causes[rank]
        return RankFailure(f"rank {rank} of {self.tp} failed: {type(cause).__name__}: {_first_line(cause)}; "
                           "all ranks of this run were stopped")

    def _release(self) -> None:
        """Kill the actors (their processes exit; nothing is left behind), free the bundles."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors, self.serving = [], {}
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False


def _error(ref: Any) -> Optional[BaseException]:
    """The exception a finished call raised, or None if it returned."""
    try:
        ray.get(ref, timeout=0)
        return None
    except Exception as exc:  # RayTaskError (it raised), RayActorError (its process died), ...
        return exc


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

"""Tensor parallelism on two GPUs: the peer-memory all-reduce against NCCL's sums, eagerly and
replayed in a CUDA graph, and TP=2 through Ray with NCCL giving TP=1's greedy tokens with it on
and off. Skipped without two GPUs."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from helpers import greedy

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
pytestmark = [pytest.mark.gpu, two_gpus]

ROWS = (1, 3, 129, 256)  # hidden rows a message: batch 1, an odd batch, the smallest two-shot one, 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, errors) -> None:
    import torch.distributed as dist

    from framework import parallel
    from framework.symm_all_reduce import make_symm_all_reduce
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        device = torch.device("cuda", rank)
        for dtype in (torch.bfloat16, torch.float32):
            reducer = make_symm_all_reduce(dist.group.WORLD, device, dtype)
            assert reducer is not None, "peer-memory all-reduce unavailable"
            parallel.set_symm_all_reduce(reducer)
            gen = torch.Generator(device).manual_seed(rank)
            for rows in ROWS:
                x = torch.randn(rows, 4096, device=device, dtype=dtype, generator=gen)
                expected = x.clone()
                dist.all_reduce(expected)  # NCCL
                assert reducer.takes(x)
                got = parallel.all_reduce(x, 2)
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
                # Captured once, replayed on new inputs: the graph reads the input buffer afresh.
                static = torch.zeros_like(x)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = parallel.all_reduce(static, 2)
                for _ in range(3):
                    static.copy_(torch.randn(static.shape, device=device, dtype=dtype, generator=gen))
                    expected = static.clone()
                    dist.all_reduce(expected)
                    graph.replay()
                    torch.testing.assert_close(out, expected, rtol=0, atol=0)
            for numel in (reducer.max_numel + 1024, 4096 + 2):  # past the buffer; not whole 16-byte words
                odd = torch.ones(numel, device=device, dtype=dtype)
                assert not reducer.takes(odd)  # NCCL
                assert torch.equal(parallel.all_reduce(odd, 2), torch.full_like(odd, 2))
        dist.destroy_process_group()
    except BaseException as exc:  # reported to the test in the parent
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def test_symm_all_reduce_equals_nccl_eager_and_in_graphs():
    ctx = torch.multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, errors)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    messages = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not messages, messages
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("custom_all_reduce", [True, False], ids=["symm", "nccl"])
def test_tp2_on_two_gpus_matches_tp1(tiny_model, custom_all_reduce):
    from test_gpu import gpu_config
    model_dir = tiny_model("llama")
    single = gpu_config(model_dir)
    expected, _ = greedy(single, max_tokens=12)
    cfg = gpu_config(model_dir)
    cfg.parallelism.tensor_parallel_size = 2
    cfg.parallelism.custom_all_reduce = custom_all_reduce
    ours, ranks = greedy(cfg, max_tokens=12)
    assert ours == expected
    assert [r["symm_all_reduce"] for r in ranks] == [custom_all_reduce] * 2
    assert all(r["device"].startswith("cuda") for r in ranks)


def _used_bytes_per_gpu():
    """Device memory in use on each GPU, read through NVML (no CUDA context made here)."""
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    try:
        return [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.usefixtures("ray_cluster")
def test_killed_gpu_rank_ends_the_run_and_frees_both_gpus(tiny_model):
    """A TP=2 rank on a GPU killed mid-run (as the OOM killer would): one error naming it, no
    process left, and each GPU's memory back to what it was before the run."""
    import signal
    import threading
    import time

    from framework import SamplingParams
    from framework.llm import LLM
    from launchers.ray import RankFailure
    from test_gpu import gpu_config
    from test_ray_launcher import all_gone

    before = _used_bytes_per_gpu()
    cfg = gpu_config(tiny_model("llama"))
    cfg.parallelism.tensor_parallel_size = 2
    cfg.cache.max_model_len, cfg.cache.allow_long_max_model_len = 4096, True
    llm = LLM(cfg)
    pids = list(llm.launcher.pids)
    assert all(used > was + (64 << 20) for used, was in zip(_used_bytes_per_gpu(), before))  # both hold the run
    killer = threading.Timer(2.0, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    with pytest.raises(RankFailure, match=rf"rank 1 of 2 \(pid {pids[1]}\) died"):
        llm.generate([{"prompt_token_ids": [i + 1, 2, 3]} for i in range(8)],
                     SamplingParams(max_tokens=4000, ignore_eos=True))
    assert all_gone(pids)
    deadline = time.monotonic() + 20  # the driver frees its memory as the processes exit
    while time.monotonic() < deadline and any(used > was + (64 << 20)
                                              for used, was in zip(_used_bytes_per_gpu(), before)):
        time.sleep(0.5)
    assert [used <= was + (64 << 20) for used, was in zip(_used_bytes_per_gpu(), before)] == [True, True]

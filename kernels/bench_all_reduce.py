"""All-reduce latency on two GPUs of one host: NCCL against the peer-memory one-shot and two-shot
of framework/symm_all_reduce.py, on decode-step messages of rows x hidden (bf16):

    python -m kernels.bench_all_reduce [--hidden 4096]

Two processes, one GPU each; per size, 64 all-reduces chained in one CUDA graph, replayed 20
times: µs a call, as a TP=2 decode step pays them (its 65 all-reduces run inside a graph).
Keep NVLink multicast off (NCCL_NVLS_ENABLE=0; the peer path never uses it).
"""
from __future__ import annotations

import argparse
import socket
import time

import torch
import torch.distributed as dist

ROWS = (1, 8, 32, 64, 128, 256, 512, 1024, 4096)
CHAIN, REPLAYS = 64, 20


def _time_graph(fn, x: torch.Tensor) -> float:
    for _ in range(3):
        fn(x.clone())
    torch.cuda.synchronize()
    graph, y = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        for _ in range(CHAIN):
            y = fn(y)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPLAYS / CHAIN * 1e6


def _rank(rank: int, port: int, hidden: int) -> None:
    from framework import symm_all_reduce as symm
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    reducer = symm.SymmAllReduce(dist.group.WORLD, device, torch.bfloat16, max_bytes=max(ROWS) * hidden * 2)

    def nccl(x):
        dist.all_reduce(x)
        return x

    if rank == 0:
        print(f"{'rows':>6} {'bytes':>9} {'NCCL':>8} {'one-shot':>9} {'two-shot':>9}  (us a call, bf16, hidden {hidden})")
    for rows in ROWS:
        x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
        times = [_time_graph(fn, x) for fn in (nccl, reducer.one_shot, reducer.two_shot)]
        if rank == 0:
            print(f"{rows:>6} {rows * hidden * 2:>9} " + " ".join(f"{t:>8.1f}" for t in times), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(rank, port, args.hidden)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()

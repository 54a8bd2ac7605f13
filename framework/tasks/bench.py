"""task=bench: offline throughput on a fixed synthetic workload, against HF transformers
`generate` on the same requests, the same model and device, in the same process.

On a GPU it also times batch-1 decode (one greedy request through the whole engine, and the
batch-1 CUDA graph alone) against the roofline: the device-to-device copy bandwidth measured in
this run over the weight bytes a step reads. Start-up time (to a ready engine), the CUDA graph
pool and capture time, and the KV budget's terms come from the runner's stats."""
from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from framework.config.schema import FrameworkConfig
from framework.engine.outputs import RequestOutput
from framework.resolve import pick_device, pick_dtype
from framework.engine.sampling_params import SamplingParams
from framework.llm import LLM
from framework.memory.compare import compare_rows, format_comparison
from framework.tasks.generate import summarize
from framework.tasks.metrics import write_metrics
from framework.tasks.profile import format_profile, profile_run
from framework.tasks.roofline import engine_costs, format_kinds, matmul_peak, schedule_roofline
from framework.engine.step_log import StepLog
from kernels.precompile import count_compiles

HF_BATCH = 64  # HF pads a batch to its longest request; larger batches waste more


@dataclass
class Workload:
    prompts: List[List[int]]
    output_lens: List[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(cfg: FrameworkConfig, vocab_size: int) -> Workload:
    t = cfg.task
    rng = random.Random(t.seed if t.seed is not None else 0)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(*t.input_len_range))]
               for _ in range(t.num_requests)]
    return Workload(prompts, [rng.randint(*t.output_len_range) for _ in range(t.num_requests)])


def warm_up(llm: LLM, work: Workload) -> None:
    """One short request, as any server's first: the run after it is a process's first run."""
    llm.generate([{"prompt_token_ids": work.prompts[0][:8]}], SamplingParams(max_tokens=4, ignore_eos=True))


def bench_ours(llm: LLM, work: Workload) -> Tuple[float, List[RequestOutput]]:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params)
    seconds = time.perf_counter() - start
    assert sum(len(o.token_ids) for o in outputs) == work.output_tokens, "a request stopped early"
    return seconds, outputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_hf(cfg: FrameworkConfig, model_path: Path, hf_config: Any, work: Workload) -> float:
    """Seconds HF transformers takes for `work`: `generate` over left-padded batches, or
    `generate_batch` (task.compare_hf_api). Each request runs to the longest output length asked
    (HF takes one for all); only each request's own output tokens count."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its weight-loading bar would land in the middle of bench's report
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device, hf_config)
    paged = cfg.task.compare_hf_api == "generate_batch"
    attn = {"attn_implementation": _paged_sdpa()} if paged else {}  # generate_batch's paged KV cache
    if cfg.model.load_format == "dummy":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, **attn).to(device)
    model.eval()
    seconds = _hf_generate_batch(model, work, device) if paged else _hf_generate(model, work, device)
    del model
    gc.collect()
    return seconds


def _paged_sdpa() -> str:
    """generate_batch's attention: "paged|sdpa" up to transformers 5.22; later ones page plain
    "sdpa" themselves and warn that the prefix goes away."""
    import transformers
    from packaging.version import Version
    return "sdpa" if Version(transformers.__version__).release >= (5, 23) else "paged|sdpa"


def _hf_generate_batch(model: Any, work: Workload, device: torch.device) -> float:
    from transformers import GenerationConfig
    gen = GenerationConfig(max_new_tokens=max(work.output_lens), do_sample=False, eos_token_id=None, pad_token_id=0)
    _sync(device)
    begin = time.perf_counter()
    # not under inference_mode: its loop runs in a thread of its own, which may not update
    # inference tensors made here (transformers 5.17 refuses); generate_batch runs without grad itself
    out = model.generate_batch(inputs=work.prompts, generation_config=gen, progress_bar=False)
    _sync(device)
    seconds = time.perf_counter() - begin
    short = [r for r in out.values() if len(r.generated_tokens) < max(work.output_lens)]
    assert len(out) == len(work.prompts) and not short, "HF generate_batch stopped a request early"
    return seconds


def _hf_generate(model: Any, work: Workload, device: torch.device) -> float:
    seconds = 0.0
    for start in range(0, len(work.prompts), HF_BATCH):
        prompts, lens = work.prompts[start:start + HF_BATCH], work.output_lens[start:start + HF_BATCH]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        _sync(device)
        begin = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, pad_token_id=0)
        _sync(device)
        seconds += time.perf_counter() - begin
    return seconds


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy of nbytes: bytes read + written per second (median of iters)."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


PROFILED_BATCH1_TOKENS = 64  # enough steps to average, few enough kernels to read back quickly


def bench_decode_batch1(llm: LLM, tokens: int, vocab_size: int, run_dir: Path) -> Dict[str, Any]:
    """One greedy request (128 prompt tokens, `tokens` out) alone: decode tok/s after the first
    token, through the whole engine (scheduler, step building, graph replay, sampling). Then one
    shorter request under torch.profiler: each decode step's device time by kind of kernel, and
    the device's idle time between them (profile_batch1.txt has every kernel)."""
    rng = random.Random(1)
    prompt = {"prompt_token_ids": [rng.randrange(vocab_size) for _ in range(128)]}
    llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))  # warm
    out = llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))[0]
    result: Dict[str, Any] = {"tokens": tokens, "engine_tok_s": (tokens - 1) / (out.latency - out.time_to_first_token)}
    engine = llm.launcher.local_engine()
    graphs = engine.runner.graphs if engine is not None else None
    if graphs is not None and 1 in graphs.graphs:
        result["graph_replay_tok_s"] = 1.0 / graphs.time_replay(1)
    if engine is not None:
        params = SamplingParams(max_tokens=PROFILED_BATCH1_TOKENS, temperature=0, ignore_eos=True)

        def one_request() -> float:
            begin = time.perf_counter()
            llm.generate([prompt], params)
            return time.perf_counter() - begin
        result["profile"] = profile_run(one_request, run_dir, "profile_batch1.txt")
    return result


def embedding_bytes(stats: Dict[str, Any], hf_config: Any) -> int:
    """The input embedding table, which a decode step reads one row of (unless tied to lm_head)."""
    if getattr(hf_config, "tie_word_embeddings", False):
        return 0
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}.get(stats["dtype"], 2)
    return hf_config.vocab_size * hf_config.hidden_size * elem


def _ceilings(device: torch.device) -> Tuple[float, float]:
    return copy_bandwidth(device), matmul_peak(device)


def measure_ceilings(cfg: FrameworkConfig, device: torch.device) -> Tuple[float, float]:
    """(copy bytes/s, bf16 matmul FLOP/s) of the GPU. Where the ranks run in other processes
    (Ray), in a child process of its own: a CUDA context left in this one would sit on rank 0's
    GPU and count in its measured memory against the plan."""
    from launchers import launcher_name
    if launcher_name(cfg) == "local":
        return _ceilings(device)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_ceilings, device).result()


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    t = cfg.task
    device = pick_device(cfg.model.device)
    on_gpu = device.type == "cuda"
    # both ceilings of the schedule roofline, and the batch-1 roofline, measured before the engine
    copy_bps, peak_flops = measure_ceilings(cfg, device) if on_gpu else (None, None)
    start = time.perf_counter()
    with LLM(cfg) as llm:
        startup = time.perf_counter() - start
        work = make_workload(cfg, llm.hf_config.vocab_size)
        engine = llm.launcher.local_engine()
        steps = StepLog(device) if engine is not None else None
        with count_compiles() as warm_compiled:
            warm_up(llm, work)
        runs: List[float] = []
        compiled: List[List[str]] = []  # Triton variants compiled inside each run: start-up missed them
        for _ in range(t.runs):  # the step log keeps the last run's steps
            if steps is not None:
                steps.begin()
                engine.step_log = steps
            with count_compiles() as names:
                seconds, outputs = bench_ours(llm, work)
            runs.append(seconds)
            compiled.append(names)
        if engine is not None:
            engine.step_log = None
        roofline = None
        if steps is not None and on_gpu:
            roofline = schedule_roofline(steps.records, engine_costs(engine), copy_bps, peak_flops,
                                         steps.step_seconds())
        prof = None
        if t.profile and on_gpu:
            prof = profile_run(lambda: bench_ours(llm, work)[0], run_dir)
        decode = bench_decode_batch1(llm, t.decode_batch1_tokens, llm.hf_config.vocab_size, run_dir) \
            if on_gpu and t.decode_batch1_tokens else None
        stats = llm.stats()
        phases = llm.startup_seconds
        plan = llm.plan.to_dict() if llm.plan else None
        model_path, hf_config = llm.model_path, llm.hf_config
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    ours = runs[-1]
    ours_tps = work.output_tokens / ours
    rank0 = stats["ranks"][0]
    print(f"bench: {t.num_requests} requests, prompts {t.input_len_range[0]}-{t.input_len_range[1]} tokens, "
          f"outputs {t.output_len_range[0]}-{t.output_len_range[1]} tokens, ignore_eos")
    print(f"  start-up to a ready engine: {startup:.1f} s (config.json and checks {phases['config']:.1f} s, "
          f"plan {phases['plan']:.1f} s, engine {phases['engine']:.1f} s: weights {rank0['load_seconds']:.1f} s"
          + (f", memory profile {rank0['profile_seconds']:.1f} s" if "profile_seconds" in rank0 else "")
          + (f", CUDA graphs {rank0['cudagraph_capture_seconds']:.1f} s" if "cudagraph_capture_seconds" in rank0
             else "") + f"; compilation level {rank0.get('compilation_level', 'n/a')})")
    if "precompile_seconds" in rank0:
        print(f"    of which Triton precompilation {rank0['precompile_seconds']:.1f} s: "
              f"{rank0['precompile_variants']} kernel variants noted in {rank0['precompile_record_seconds']:.1f} s, "
              f"compiled by {rank0['precompile_workers']} processes"
              + f", {rank0['precompile_compiled_here']} of them compiled again here ({rank0['precompile_failed']} "
              f"failed in a worker)")
    print(f"  ours: {work.output_tokens} output tokens in {ours:.2f} s = {ours_tps:,.1f} tok/s"
          + (f" (the last of {len(runs)} runs)" if len(runs) > 1 else ""))
    if len(runs) > 1:
        print(f"    runs in this process (s): {', '.join(f'{r:.2f}' for r in runs)}; the first (cold) at "
              f"{100 * min(runs) / runs[0]:.0f}% of the best one's speed")
    if engine is not None and on_gpu:
        late = warm_compiled + compiled[0]
        print(f"    Triton kernel variants compiled after start-up: {len(warm_compiled)} in the warm-up request, "
              f"{', '.join(str(len(c)) for c in compiled)} in the runs"
              + (f" (first ones: {'; '.join(late[:6])})" if late else ""))
    latency = summarize(outputs, ours)  # every request arrives at once: latency includes queueing
    print(f"  latency per request (s): p50 {latency['latency_s']['p50']}, p90 {latency['latency_s']['p90']}, "
          f"p99 {latency['latency_s']['p99']}; time to first token p50 {latency['ttft_s']['p50']}, "
          f"p99 {latency['ttft_s']['p99']}")
    result: Dict[str, Any] = {"output_tokens": work.output_tokens, "seconds": round(ours, 4),
                              "output_tokens_per_s": round(ours_tps, 2), "startup_seconds": round(startup, 2),
                              "startup_phases_seconds": {k: round(v, 3) for k, v in phases.items()},
                              "runs_seconds": [round(r, 4) for r in runs],
                              "triton_compiles_per_run": [len(c) for c in compiled],
                              "requests": len(outputs), "latency_s": latency["latency_s"], "ttft_s": latency["ttft_s"]}
    if roofline is not None:
        floor, device_s = roofline["floor_seconds"], sum(k["seconds"] for k in roofline["kinds"].values())
        print(f"  schedule roofline: {roofline['steps']} steps moving {roofline['bytes'] / 1e12:.2f} TB and "
              f"computing {roofline['flops'] / 1e15:.2f} PFLOP; ceilings measured now: copy "
              f"{copy_bps / 1e12:.2f} TB/s, bf16 matmul {peak_flops / 1e12:.0f} TFLOP/s")
        print(f"    sum of the steps' floors {floor:.2f} s -> {work.output_tokens / floor:,.0f} tok/s; the engine took "
              f"{ours:.2f} s: {100 * floor / ours:.0f}% of the schedule roofline (device time of the steps "
              f"{device_s:.2f} s)")
        serial = roofline["serial_floor_seconds"]
        print(f"    linears and attention each at their own bound, in turn: {serial:.2f} s -> the engine at "
              f"{100 * serial / ours:.0f}% of that")
        print("\n".join(format_kinds(roofline["kinds"])))
        result["schedule_roofline"] = {**roofline, "copy_Bps": copy_bps, "matmul_flops": peak_flops,
                                       "share": floor / ours}
    if prof is not None:
        print(f"  profile of one more run ({prof['wall_seconds']:.2f} s under torch.profiler; every kernel in "
              f"{run_dir / 'profile.txt'}):")
        print("\n".join(format_profile(prof)))
        result["profile"] = prof
    if decode is not None:
        weights = rank0["weight_bytes"]
        step_bytes = weights - embedding_bytes(rank0, hf_config)
        decode.update(copy_bandwidth_Bps=copy_bps, weight_bytes=weights, step_weight_bytes=step_bytes,
                      roofline_tok_s=copy_bps / weights, achieved_Bps=weights * decode["engine_tok_s"],
                      share_of_roofline=weights * decode["engine_tok_s"] / copy_bps)
        print(f"  batch-1 decode: {decode['engine_tok_s']:.1f} tok/s through the engine"
              + (f", {decode['graph_replay_tok_s']:.1f} tok/s replaying the batch-1 graph alone"
                 if "graph_replay_tok_s" in decode else ""))
        print(f"    {weights / 1e9:.2f} GB of weights x tok/s = {decode['achieved_Bps'] / 1e12:.2f} TB/s; "
              f"device copy {copy_bps / 1e12:.2f} TB/s -> roofline {decode['roofline_tok_s']:.1f} tok/s; "
              f"engine at {100 * decode['share_of_roofline']:.0f}% of it")
        print(f"    bytes a step really reads (weights less the embedding table): {step_bytes / 1e9:.2f} GB -> "
              f"{step_bytes * decode['engine_tok_s'] / 1e12:.2f} TB/s = "
              f"{100 * step_bytes * decode['engine_tok_s'] / copy_bps:.0f}% of the copy")
        if "profile" in decode:
            prof = decode.pop("profile")
            per_step = 1e3 / PROFILED_BATCH1_TOKENS  # ms per step (the prefill step is in there too)
            print(f"    one request of {PROFILED_BATCH1_TOKENS} tokens under torch.profiler: wall "
                  f"{prof['wall_seconds'] * per_step:.3f} ms a token, kernels "
                  f"{prof['kernel_seconds'] * per_step:.3f} ms, device idle {prof['idle_seconds'] * per_step:.3f} ms "
                  f"(the prompt's step included; every kernel in {run_dir / 'profile_batch1.txt'}):")
            print("\n".join(f"      {kind:<26}{s * per_step:>7.3f} ms a token" for kind, s in
                            sorted(prof["kinds"].items(), key=lambda kv: -kv[1])))
            result["decode_batch1_profile"] = prof
        result["decode_batch1"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in decode.items()}
    if on_gpu:
        print(f"  device memory in use at the end: {rank0['device_used_bytes'] / 2**30:.2f} GiB; "
              f"peak allocated by torch {rank0['peak_allocated_bytes'] / 2**30:.2f} GiB")
    if "kv_budget_bytes" in rank0:
        g, gib = rank0, 2 ** 30
        print(f"  KV cache at gpu_memory_utilization={g['gpu_memory_utilization']}: {g['kv_tokens']:,} tokens; "
              f"the formula gives {g['kv_tokens_formula']:,}, the weights-only bound {g['kv_tokens_weights_only']:,}")
        print(f"    terms (GiB): total {g['total_bytes'] / gib:.2f}, weights {g['weight_bytes'] / gib:.2f}, "
              f"model buffers {g['model_buffer_bytes'] / gib:.2f}, activation peak {g['activation_peak_bytes'] / gib:.2f}, "
              f"CUDA graphs {g['cudagraph_estimate_bytes'] / gib:.3f} (measured after capture: "
              f"{g.get('cudagraph_bytes', 0) / gib:.3f}), non-torch {g['non_torch_bytes'] / gib:.2f}")
    if t.compare_hf:
        n = min(t.compare_hf_requests or len(work.prompts), len(work.prompts))
        subset = Workload(work.prompts[:n], work.output_lens[:n])
        hf = bench_hf(cfg, model_path, hf_config, subset)
        hf_tps = subset.output_tokens / hf
        what = "" if n == len(work.prompts) else f" on the first {n} of {len(work.prompts)} requests"
        api = f"generate_batch (continuous batching, {_paged_sdpa()})" if t.compare_hf_api == "generate_batch" \
            else f"generate (left-padded batches of {HF_BATCH})"
        print(f"  HF transformers {api}{what}: {subset.output_tokens} "
              f"output tokens in {hf:.2f} s = {hf_tps:,.1f} tok/s")
        print(f"  ratio ours / HF: {ours_tps / hf_tps:.2f}x")
        result.update(hf_api=t.compare_hf_api, hf_requests=n, hf_output_tokens=subset.output_tokens, hf_seconds=round(hf, 4),
                      hf_output_tokens_per_s=round(hf_tps, 2), ratio_vs_hf=round(ours_tps / hf_tps, 3))
    comparison = compare_rows(plan, stats["ranks"]) if plan else []
    if comparison:
        print(format_comparison(comparison))
    write_metrics(run_dir, {"throughput": result, "measured": stats, "plan": plan, "plan_vs_measured": comparison})
    return 0

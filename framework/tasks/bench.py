"""task=bench: offline throughput on a fixed synthetic workload, against HF transformers
`generate` on the same requests, the same model and device, in the same process."""
from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

import torch

from framework.config.schema import FrameworkConfig
from framework.engine.model_runner import pick_device, pick_dtype
from framework.engine.sampling_params import SamplingParams
from framework.llm import LLM
from framework.tasks.metrics import write_metrics

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


def bench_ours(llm: LLM, work: Workload) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    llm.generate([{"prompt_token_ids": work.prompts[0][:8]}], SamplingParams(max_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params)
    seconds = time.perf_counter() - start
    assert sum(len(o.token_ids) for o in outputs) == work.output_tokens, "a request stopped early"
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_hf(cfg: FrameworkConfig, model_path: Path, hf_config: Any, work: Workload) -> float:
    """HF generate over left-padded batches; only each request's own output tokens count."""
    from transformers import AutoModelForCausalLM
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device, hf_config)
    if cfg.model.load_format == "dummy":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(device)
    model.eval()
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
    del model
    gc.collect()
    return seconds


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    t = cfg.task
    with LLM(cfg) as llm:
        work = make_workload(cfg, llm.hf_config.vocab_size)
        ours = bench_ours(llm, work)
        stats = llm.stats()
        model_path, hf_config = llm.model_path, llm.hf_config
    gc.collect()
    ours_tps = work.output_tokens / ours
    print(f"bench: {t.num_requests} requests, prompts {t.input_len_range[0]}-{t.input_len_range[1]} tokens, "
          f"outputs {t.output_len_range[0]}-{t.output_len_range[1]} tokens, ignore_eos")
    print(f"  ours: {work.output_tokens} output tokens in {ours:.2f} s = {ours_tps:,.1f} tok/s")
    result = {"output_tokens": work.output_tokens, "seconds": round(ours, 4),
              "output_tokens_per_s": round(ours_tps, 2)}
    if t.compare_hf:
        hf = bench_hf(cfg, model_path, hf_config, work)
        hf_tps = work.output_tokens / hf
        print(f"  HF transformers generate (left-padded batches of {HF_BATCH}): {hf:.2f} s = {hf_tps:,.1f} tok/s")
        print(f"  ratio ours / HF: {ours_tps / hf_tps:.2f}x")
        result.update(hf_seconds=round(hf, 4), hf_output_tokens_per_s=round(hf_tps, 2),
                      ratio_vs_hf=round(ours_tps / hf_tps, 3))
    write_metrics(run_dir, {"throughput": result, "measured": stats})
    return 0

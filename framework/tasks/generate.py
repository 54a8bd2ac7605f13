"""task=generate: run the prompts, print the completions, write them as JSONL."""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import List

from framework.config.schema import FrameworkConfig
from framework.engine.outputs import RequestOutput
from framework.llm import LLM
from framework.memory.compare import compare_rows, format_comparison
from framework.tasks.metrics import write_metrics
from framework.tasks.prompts import load_images, load_prompts, sampling_params


def percentiles(values: List[float]) -> dict:
    """Nearest-rank p50/p90/p99 and the mean, in seconds."""
    ranked = sorted(values) or [0.0]
    pick = lambda q: ranked[max(0, math.ceil(q * len(ranked)) - 1)]  # noqa: E731
    return {"p50": round(pick(0.5), 4), "p90": round(pick(0.9), 4), "p99": round(pick(0.99), 4),
            "mean": round(statistics.fmean(ranked), 4)}


def summarize(outputs: List[RequestOutput], seconds: float) -> dict:
    ok = [o for o in outputs if o.error is None]
    tokens = sum(len(o.token_ids) for o in ok)
    ttft = percentiles([o.time_to_first_token for o in ok])
    return {"requests": len(outputs), "failed_requests": len(outputs) - len(ok), "output_tokens": tokens,
            "seconds": round(seconds, 4), "output_tokens_per_s": round(tokens / seconds, 2) if seconds else None,
            "latency_s": percentiles([o.latency for o in ok]), "ttft_s": ttft,
            "ttft_s_p50": ttft["p50"] if ok else None}


def run(cfg: FrameworkConfig, run_dir: Path, chat: bool = False) -> int:
    prompts = load_prompts(cfg.task)
    images = load_images(cfg.task, len(prompts))
    with LLM(cfg) as llm:
        start = time.perf_counter()
        if chat and any(images):  # content parts: the model's template writes the placeholders
            conversations = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": i}} for i in imgs]
                               + [{"type": "text", "text": p}]}] for p, imgs in zip(prompts, images)]
            outputs = llm.chat(conversations, sampling_params(cfg.task), use_tqdm=cfg.task.progress)
        else:
            inputs = [llm.apply_chat_template(p) for p in prompts] if chat else prompts
            inputs = [{"prompt": p, "multi_modal_data": {"image": imgs}} if imgs else p
                      for p, imgs in zip(inputs, images)]
            outputs = llm.generate(inputs, sampling_params(cfg.task), use_tqdm=cfg.task.progress)
        seconds = time.perf_counter() - start
        stats = llm.stats()
    out_path = Path(run_dir) / cfg.task.output_file
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for prompt, o in zip(prompts, outputs):
            f.write(json.dumps({"prompt": prompt, "text": o.text if not o.error else None,
                                "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                                "error": o.error}) + "\n")
    for prompt, o in zip(prompts, outputs):
        print(f"\n>>> {prompt}\n{o.error or o.text}" + ("" if o.error else f"  [{o.finish_reason}]"))
    summary = summarize(outputs, seconds)
    print(f"\n{summary['requests']} requests, {summary['output_tokens']} tokens in {seconds:.2f} s "
          f"({summary['output_tokens_per_s']} tok/s); outputs in {out_path}")
    plan = llm.plan.to_dict() if llm.plan else None
    comparison = compare_rows(plan, stats["ranks"]) if plan else []
    if comparison:
        print(format_comparison(comparison))
    write_metrics(run_dir, {"throughput": summary, "measured": stats, "plan": plan, "plan_vs_measured": comparison})
    return 1 if summary["failed_requests"] == summary["requests"] else 0

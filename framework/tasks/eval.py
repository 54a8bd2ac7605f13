"""task=eval: perplexity of the model on a fixed text, computed by the engine's own model runner.

The number is only worth comparing between runs of one model that differ in a knob
(`quantization.method`, `cache.kv_cache_dtype`): the change in perplexity is that knob's
quality cost. Every token goes through the same forward the engine serves with (quantized
linear layers, paged attention reading K/V back from the cache at its precision).

The text is `task.prompts_file` when set (the whole file), else a fixed slice of CPython's
`pydoc_data.topics`: every EVERY_NTH-th topic in sorted order, each as `bos topic eos` like the
bundled model's training stream. The bundled model was trained on *all* of pydoc_data, so
this slice is not held out: on it, perplexity measures how much of the fit a knob keeps.
pydoc_data changes between Python versions, so eval.json records the version and a hash of the
scored tokens: compare runs only where the hash is the same.

The token stream is cut into non-overlapping windows of WINDOW tokens (fewer if
cache.max_model_len or cache.max_num_batched_tokens is smaller), at most MAX_TOKENS tokens in
all. Each window is one fresh sequence prefilled in one step; every token but its first is
scored, so the first tokens of a window see little context (the same for every run compared).

`task.quantizations=[none,int8,fp8,int4]` scores each method in turn, in one process, and prints
one table: perplexity (and its change against the first), weight bytes, scoring speed (tokens
a second of the windows' prefill), decode speed (one greedy request of DECODE_TOKENS tokens)
and, on a GPU, the peak memory torch allocated. Speeds here are of this text on this machine:
the GPU figures that matter come from task=bench (BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, List


from framework.config.errors import UserError
from framework.config.schema import FrameworkConfig
from framework.llm import LLM
from framework.tasks.metrics import write_metrics

WINDOW = 256  # the bundled model's training window
MAX_TOKENS = 8192
EVERY_NTH = 8  # of pydoc_data's topics in sorted order: 10 of 79 topics, the first being "assert"
DECODE_PROMPT, DECODE_TOKENS = 32, 128  # the decode-speed request: its prompt, then tokens generated


@dataclass
class EvalResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    scored_tokens: int
    windows: int
    window: int
    text: str  # where the text came from
    tokens_sha256: str  # of the scored token ids (first 16 hex digits): same hash, same text
    seconds: float


def default_text(tokenizer: Any) -> List[int]:
    from pydoc_data.topics import topics
    ids: List[int] = []
    for key in sorted(topics)[::EVERY_NTH]:
        text = topics[key].strip() + "\n"  # long topics exceed model_max_length: windows cut them, no warning
        ids += [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False, verbose=False),
                tokenizer.eos_token_id]
    return [i for i in ids if i is not None]


def file_text(tokenizer: Any, path: str) -> List[int]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"task.prompts_file={path!r}: no such file")
    return tokenizer.encode(file.read_text(), verbose=False)


def perplexity(llm: LLM, ids: List[int], window: int, source: str = "") -> EvalResult:
    start = time.perf_counter()
    ids = ids[:MAX_TOKENS]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) > 1]  # a lone token has nothing to predict
    if not windows:
        raise UserError(f"the evaluation text ({source}) has fewer than 2 tokens")
    nll = sum(llm.score(windows))
    scored = sum(len(w) - 1 for w in windows)
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return EvalResult(perplexity=math.exp(nll / scored), mean_nll=nll / scored, scored_tokens=scored,
                      windows=len(windows), window=window, text=source, tokens_sha256=digest,
                      seconds=time.perf_counter() - start)


@dataclass
class MethodRow:
    """One line of the comparison table: a quantization method's quality, speed and memory."""
    quantization: str
    perplexity: float
    weight_bytes: int
    score_tok_s: float  # scored tokens a second (prefill of whole windows)
    decode_tok_s: float  # one greedy request, DECODE_TOKENS tokens after its prompt
    device_peak_bytes: int  # peak allocated by torch on rank 0 (0 on the CPU)


def decode_speed(llm: LLM, ids: List[int]) -> float:
    """Tokens a second of one greedy request decoding DECODE_TOKENS tokens (a warm-up first)."""
    from framework.engine.sampling_params import SamplingParams
    prompt = [{"prompt_token_ids": ids[:DECODE_PROMPT]}]
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True))
    return DECODE_TOKENS / (time.perf_counter() - start)


def evaluate(cfg: FrameworkConfig) -> tuple:
    """(EvalResult, MethodRow, stats) of one configuration."""
    with LLM(cfg) as llm:
        if llm.tokenizer is None:
            raise UserError(f"task=eval needs a tokenizer; {cfg.model.path} has none (set model.tokenizer)")
        if cfg.task.prompts_file:
            ids, source = file_text(llm.tokenizer, cfg.task.prompts_file), cfg.task.prompts_file
        else:
            ids = default_text(llm.tokenizer)
            source = f"pydoc_data.topics of Python {platform.python_version()}, every {EVERY_NTH}th topic"
        window = min(WINDOW, llm.config.cache.max_model_len, llm.config.cache.max_num_batched_tokens)
        llm.score([ids[:window]])  # warm-up: the first forward's one-time costs stay out of the scoring speed
        result = perplexity(llm, ids, window, source)
        decode = decode_speed(llm, ids) if len(ids) > 1 and DECODE_PROMPT + DECODE_TOKENS <= window else 0.0
        stats = llm.stats()
    rank0 = stats["ranks"][0]
    row = MethodRow(quantization=llm.config.quantization.method, perplexity=result.perplexity,
                    weight_bytes=rank0["weight_bytes"], score_tok_s=result.scored_tokens / result.seconds,
                    decode_tok_s=decode, device_peak_bytes=rank0.get("peak_allocated_bytes", 0) or 0)
    return result, row, stats


def format_table(rows: List[MethodRow]) -> str:
    """Markdown: each method against the first row (perplexity change, speeds as ratios)."""
    base = rows[0]
    lines = ["| `quantization=` | weight bytes | perplexity | change | scoring tok/s | decode tok/s | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        change = "—" if r is base else f"{100 * (r.perplexity / base.perplexity - 1):+.2f}%"
        ratio = "" if r is base or not base.decode_tok_s else f" ({r.decode_tok_s / base.decode_tok_s:.2f}×)"
        peak = f"{r.device_peak_bytes / 2**30:.2f} GiB" if r.device_peak_bytes else "—"
        lines.append(f"| {r.quantization} | {r.weight_bytes / 2**20:.2f} MiB | {r.perplexity:.4f} | {change} | "
                     f"{r.score_tok_s:,.0f} | {r.decode_tok_s:,.1f}{ratio} | {peak} |")
    return "\n".join(lines)


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    methods = cfg.task.quantizations or [cfg.quantization.method]
    records, rows, all_stats = [], [], []
    for method in methods:
        one = replace(cfg, quantization=replace(cfg.quantization, method=method))
        result, row, stats = evaluate(one)
        record = {"quantization": row.quantization, "kv_cache_dtype": cfg.cache.kv_cache_dtype, **asdict(result),
                  "weight_bytes": row.weight_bytes, "score_tok_s": row.score_tok_s,
                  "decode_tok_s": row.decode_tok_s, "device_peak_bytes": row.device_peak_bytes}
        print(f"perplexity {result.perplexity:.4f} ({result.scored_tokens} tokens in {result.windows} windows of "
              f"{result.window}, text {result.tokens_sha256}; quantization={row.quantization}, "
              f"kv_cache_dtype={cfg.cache.kv_cache_dtype}, weights {row.weight_bytes / 2**20:.2f} MiB; "
              f"decode {row.decode_tok_s:.1f} tok/s)")
        records.append(record)
        rows.append(row)
        all_stats.append(stats)
    # one method: its record at the top level, as before; several: the first's, plus every run
    out = dict(records[0], **({"runs": records} if len(records) > 1 else {}))
    path = Path(run_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    if len(rows) > 1:
        if len({r["tokens_sha256"] for r in records}) > 1:
            raise UserError("task.quantizations: the methods scored different token streams (tokenizer differs?)")
        print(format_table(rows))
    print(f"eval: {path}")
    write_metrics(run_dir, {"eval": out, "measured": all_stats[0] if len(all_stats) == 1 else all_stats})
    return 0

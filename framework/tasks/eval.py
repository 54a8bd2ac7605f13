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
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, List


from framework.config.errors import UserError
from framework.config.schema import FrameworkConfig
from framework.llm import LLM
from framework.tasks.metrics import write_metrics

WINDOW = 256  # the bundled model's training window
MAX_TOKENS = 8192
EVERY_NTH = 8  # of pydoc_data's topics in sorted order: 10 of 79 topics, the first being "assert"


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


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    with LLM(cfg) as llm:
        if llm.tokenizer is None:
            raise UserError(f"task=eval needs a tokenizer; {cfg.model.path} has none (set model.tokenizer)")
        if cfg.task.prompts_file:
            ids, source = file_text(llm.tokenizer, cfg.task.prompts_file), cfg.task.prompts_file
        else:
            ids = default_text(llm.tokenizer)
            source = f"pydoc_data.topics of Python {platform.python_version()}, every {EVERY_NTH}th topic"
        window = min(WINDOW, llm.config.cache.max_model_len, llm.config.cache.max_num_batched_tokens)
        result = perplexity(llm, ids, window, source)
        stats = llm.stats()
    record = {"quantization": cfg.quantization.method, "kv_cache_dtype": cfg.cache.kv_cache_dtype,
              **asdict(result), "weight_bytes": stats["ranks"][0]["weight_bytes"]}
    path = Path(run_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"perplexity {result.perplexity:.4f} ({result.scored_tokens} tokens in {result.windows} windows of "
          f"{window}, text {result.tokens_sha256}; quantization={cfg.quantization.method}, "
          f"kv_cache_dtype={cfg.cache.kv_cache_dtype}, weights {record['weight_bytes'] / 2**20:.2f} MiB); {path}")
    write_metrics(run_dir, {"eval": record, "measured": stats})
    return 0

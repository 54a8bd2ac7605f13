"""A load generator for task=serve over loopback: throughput, TTFT and inter-token latency.

    python -m framework.serve.loadgen --concurrency 1,16,64 -- cache.cpu_kvcache_space_gib=1
    python -m framework.serve.loadgen --url http://127.0.0.1:8000 --concurrency 256

With --stub it serves a StubEngine instead of a model (serve/stub_engine.py): the serving stack's
own cost on any machine, as a share of the stub's ideal rate.

Without --url it starts `python -m framework.run task=serve task.port=0 <overrides>` in a child
process (so client and server do not share one interpreter), and stops it with SIGTERM at the
end. Each level sends `--num-requests` streamed completions of random token-id prompts (fixed
seed, ignore_eos, fixed lengths) with at most `concurrency` in flight. With --offline the same
requests of the largest level then run through the library (`LLM.generate`, one call, with
cache.max_num_seqs = that concurrency) for the ratio serving / offline.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from urllib.parse import urlsplit
from urllib.request import urlopen


@dataclass
class Timings:
    start: float
    first: Optional[float] = None
    chunks: List[float] = field(default_factory=list)  # arrival of each chunk with text
    tokens: int = 0
    error: Optional[str] = None


VOCAB = 1000  # prompt ids are drawn from [3, VOCAB): inside any model's vocabulary


def workload(num: int, input_len: int, output_len: int, vocab: int = VOCAB, seed: int = 0) -> List[Dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(3, vocab) for _ in range(input_len)], "max_tokens": output_len,
             "temperature": 0, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}} for _ in range(num)]


async def sse_events(url: str, body: Dict[str, Any]):
    """POST `body` and yield each server-sent event's data (HTTP/1.1, chunked): a bare asyncio
    client, so that on a small box the client costs the server as little CPU as it can."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        payload = json.dumps(body).encode()
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        status = (await reader.readline()).split(b" ")[1]
        headers = b""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            headers += line.lower()
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {(await reader.read(300))!r}")
        buffer = b""
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            buffer += (await reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:]
    finally:
        writer.close()


async def one(url: str, body: Dict[str, Any], model: str) -> Timings:
    timing = Timings(time.perf_counter())
    try:
        async for data in sse_events(url, {**body, "model": model}):
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                timing.error = chunk["error"]["message"]
            elif chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                timing.first = timing.first or now
                timing.chunks.append(now)
    except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


async def level(url: str, model: str, bodies: List[Dict[str, Any]], concurrency: int) -> Dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(body):
        async with gate:
            return await one(url, body, model)
    start = time.perf_counter()
    timings = await asyncio.gather(*(gated(b) for b in bodies))
    wall = time.perf_counter() - start
    ok = [t for t in timings if t.error is None and t.first is not None]
    ttft = [t.first - t.start for t in ok]
    itl = [b - a for t in ok for a, b in zip(t.chunks, t.chunks[1:])]
    tokens = sum(t.tokens for t in ok)
    return {"concurrency": concurrency, "requests": len(bodies), "errors": len(bodies) - len(ok),
            "first_error": next((t.error for t in timings if t.error), None), "wall_s": round(wall, 3),
            "output_tokens": tokens, "output_tok_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": _ms(ttft, 50), "ttft_p99_ms": _ms(ttft, 99),
            "itl_p50_ms": _ms(itl, 50), "itl_p99_ms": _ms(itl, 99)}


def _ms(values: List[float], pct: int) -> Optional[float]:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[pct - 1] * 1000, 2)


def start_server(overrides: List[str], stub: Optional[str] = None,
                 tokenizer: str = "") -> Tuple[subprocess.Popen, str]:
    command = (["-m", "framework.serve.stub_engine", "--timing", stub, "--tokenizer", tokenizer, *overrides] if stub else
               ["-m", "framework.run", "task=serve", "task.port=0", *overrides])
    proc = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        found = re.search(r"at (http://[\w.:\[\]]+)/v1", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError(f"the server did not start (exit code {proc.wait()})")


def offline(overrides: List[str], bodies: List[Dict[str, Any]]) -> Dict[str, Any]:
    from framework import LLM, SamplingParams, compose
    with LLM(compose(overrides)) as llm:
        prompts = [{"prompt_token_ids": b["prompt"]} for b in bodies]
        params = [SamplingParams(max_tokens=b["max_tokens"], temperature=0, ignore_eos=True) for b in bodies]
        llm.generate(prompts[:2], params[:2])  # warm
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"requests": len(bodies), "wall_s": round(wall, 3), "output_tokens": tokens,
            "output_tok_per_s": round(tokens / wall, 1)}


def write_word_tokenizer(folder: str, vocab_size: int) -> None:
    """A tokenizer of `vocab_size` made-up words ("w0", "w1", ...) for a model folder that ships
    none (the 8B shape): streaming then has text to send, one word a token, and the server pays
    for detokenizing as it would with a real vocabulary of that size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(folder)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server; default: start one with the overrides after --")
    parser.add_argument("--model", default=None, help="the model id to send (default: the server's)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    parser.add_argument("--num-requests", type=int, default=None, help="per level (default: 4 x concurrency, >= 16)")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--offline", action="store_true", help="also time LLM.generate on the largest level's requests")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--write-tokenizer", metavar="DIR:VOCAB", help="write a made-up word tokenizer and exit "
                        "(then add model.tokenizer=DIR to the overrides)")
    parser.add_argument("--stub", metavar="DEVICE_MS:HOST_MS", help="serve a StubEngine (serve/stub_engine.py) "
                        "instead of a model: the serving stack's own cost, against the stub's ideal rate")
    parser.add_argument("--stub-tokenizer", default="/tmp/wtok", help="the stub's tokenizer folder")
    parser.add_argument("overrides", nargs="*", help="config overrides for the server (and --offline)")
    args = parser.parse_args(argv)
    if args.write_tokenizer:
        folder, vocab = args.write_tokenizer.rsplit(":", 1)
        write_word_tokenizer(folder, int(vocab))
        return 0
    proc, url = ((None, args.url.rstrip("/")) if args.url else
                 start_server(args.overrides, args.stub, args.stub_tokenizer))
    results: Dict[str, Any] = {"levels": []}
    try:
        card = json.loads(urlopen(url + "/v1/models", timeout=30).read())["data"][0]
        model = args.model or card["id"]
        levels = [int(c) for c in args.concurrency.split(",")]
        top = max(levels)  # warm-up at the largest level: kernels compile before anything is timed
        asyncio.run(level(url, model, workload(top, args.input_len, 8, seed=99), top))
        for concurrency in levels:
            num = args.num_requests or max(16, 4 * concurrency)
            bodies = workload(num, args.input_len, args.output_len, seed=concurrency)
            figures = asyncio.run(level(url, model, bodies, concurrency))
            if args.stub:  # every running request gets a token each device_ms
                ideal = min(concurrency, num) * 1000 / float(args.stub.split(":")[0])
                figures["stub_ideal_tok_per_s"] = round(ideal, 1)
                figures["serving_over_ideal"] = round(figures["output_tok_per_s"] / ideal, 3)
            results["levels"].append(figures)
            print(json.dumps(figures), flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    if args.offline and not args.stub:
        concurrency = levels[-1]
        bodies = workload(args.num_requests or max(16, 4 * concurrency), args.input_len, args.output_len,
                          seed=concurrency)
        # the same requests, at most `concurrency` at once: the engine's seats play the clients
        results["offline"] = offline([*args.overrides, f"cache.max_num_seqs={concurrency}"], bodies)
        served = results["levels"][-1]["output_tok_per_s"]
        results["offline"]["serving_over_offline"] = round(served / results["offline"]["output_tok_per_s"], 3)
        print(json.dumps({"offline": results["offline"]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A stand-in engine that costs what a GPU engine costs its host: the serving stack measured alone.

At hundreds of streams the HTTP side (one event loop: decode, JSON, a socket write a stream a
step) competes with the engine thread for the interpreter. Whether that costs throughput does not
depend on the model, only on how long a step keeps the device busy and how long it holds the
host. `StubEngine` steps like the engine with async scheduling: it holds the GIL `host_ms`
(scheduling, launching step N+1), queues `device_ms` of "device" work behind the previous step,
then waits, GIL released, for step N's tokens, and gives every running request one token. Its
ideal rate is running requests / device_ms; the load generator prints serving's share of it:

    python -m framework.serve.loadgen --stub 17:4 --concurrency 256 --output-len 128

Requests get made-up tokens below `vocab_size`; `max_tokens` ends them (nothing else: no EOS).
"""
from __future__ import annotations

import argparse
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from framework.engine.outputs import CompletionOutput, RequestOutput
from framework.engine.sampling_params import SamplingParams


@dataclass
class StubTiming:
    device_ms: float = 17.0  # a step's device time (the 8B shape at 256 decodes on an H200: about 17 ms)
    host_ms: float = 4.0  # the host's share of a step, the GIL held

    @classmethod
    def parse(cls, text: str) -> "StubTiming":
        device, host = (float(x) for x in text.split(":"))
        return cls(device, host)


@dataclass
class StubSequence:
    seq_id: int
    params: SamplingParams
    prompt_token_ids: List[int]
    output_token_ids: List[int]
    text: Optional[str] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class StubEngine:
    """The LLMEngine surface that serve/engine_loop.py and serve/app.py use."""

    mm_processor = None

    def __init__(self, timing: StubTiming, tokenizer: Any, max_model_len: int = 4096):
        self.timing, self.tokenizer, self.max_model_len = timing, tokenizer, max_model_len
        self.vocab_size = len(tokenizer) if tokenizer is not None else 1000
        self.running: List[StubSequence] = []
        self.logprobs: Dict[int, list] = {}
        self.next_id = 0
        self.device_done = 0.0  # when the last queued step's device work ends
        self.rng = random.Random(0)

    def request_problem(self, token_ids: List[int], params: SamplingParams) -> Optional[str]:
        return None

    def add_request_group(self, prompt: Dict[str, Any], params: List[SamplingParams]) -> List[StubSequence]:
        seqs = []
        for p in params:
            seqs.append(StubSequence(self.next_id, p, list(prompt["prompt_token_ids"]), []))
            self.next_id += 1
        self.running.extend(seqs)
        return seqs

    def has_work(self) -> bool:
        return bool(self.running)

    def abort(self, seq: StubSequence) -> None:
        self.running = [s for s in self.running if s is not seq]

    def step(self) -> List[StubSequence]:
        busy_until = time.perf_counter() + self.timing.host_ms / 1000
        while time.perf_counter() < busy_until:  # schedule and launch the next step: the GIL held
            pass
        now = time.perf_counter()
        previous_done = self.device_done or now
        self.device_done = max(previous_done, now) + self.timing.device_ms / 1000
        wait = previous_done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the previous step's tokens: the GIL released, as in a device sync
        finished = []
        for seq in self.running:
            seq.output_token_ids.append(self.rng.randrange(3, self.vocab_size))
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                finished.append(seq)
        if finished:
            self.running = [s for s in self.running if s not in finished]
        return finished

    def output(self, seq: StubSequence, decode: bool = False) -> RequestOutput:
        return RequestOutput(str(seq.seq_id), None, seq.prompt_token_ids,
                             [CompletionOutput("", list(seq.output_token_ids), "length")])

    def gauges(self) -> Dict[str, int]:
        return {"running": len(self.running), "waiting": 0, "free_blocks": 1, "num_blocks": 1, "preemptions": 0}


def main(argv: Optional[List[str]] = None) -> None:
    import uvicorn
    from transformers import AutoTokenizer

    from framework.serve.app import ServeState, build_app
    from framework.serve.engine_loop import EngineLoop
    from framework.serve.front_process import FrontBridge, FrontSpec
    from framework.serve.metrics import ServeMetrics
    from framework.serve.server import LISTEN_BACKLOG
    parser = argparse.ArgumentParser(description="the OpenAI server over a StubEngine")
    parser.add_argument("--timing", type=StubTiming.parse, default=StubTiming(), help="DEVICE_MS:HOST_MS")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (loadgen --write-tokenizer)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="the HTTP server on a thread of the engine's "
                        "process (task.frontend_process=false) instead of a child process")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    engine = StubEngine(args.timing, tokenizer)
    loop = EngineLoop(engine)
    if not args.in_process:
        spec = FrontSpec("127.0.0.1", args.port, LISTEN_BACKLOG, "stub", engine.max_model_len, engine.vocab_size,
                         tokenizer, None, None)
        front = loop.metrics = FrontBridge(loop, spec, {})
        loop.start()
        print(f"stub engine ({args.timing}) serving at http://{front.address[0]}:{front.address[1]}/v1", flush=True)
        front.wait(None)
        return
    metrics = loop.metrics = ServeMetrics(engine)
    state = ServeState(loop, tokenizer, "stub", engine.max_model_len, metrics)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(LISTEN_BACKLOG)
    loop.start()
    print(f"stub engine ({args.timing}) serving at http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False, lifespan="off")).run(
        sockets=[sock])


if __name__ == "__main__":
    main()

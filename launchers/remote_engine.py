"""Rank 0's engine, driven from the driver process: what task=serve needs at TP > 1.

With tensor parallelism rank 0's LLMEngine lives in a Ray actor (launchers/rank.py) while the
HTTP server runs in the driver. `RemoteEngine` offers the server's engine loop
(serve/engine_loop.py) the few LLMEngine methods it calls: add a request group, abort, step,
read a finished request's output. Each `step` is one Ray call that runs one engine step in rank
0's actor and brings back a `StepReport`: every live request's output tokens (and logprobs),
the requests that finished with their outputs, and the scheduler's gauges for /metrics. The
driver keeps a `MirrorSequence` per live request, so the loop reads tokens as it would locally.
Steps between ranks still travel over torch.distributed; Ray carries one call per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from framework.engine.llm_engine import request_problem
from framework.engine.outputs import RequestOutput, TokenLogprob
from framework.engine.sampling_params import SamplingParams


@dataclass
class MirrorSequence:
    """The driver's view of one request in rank 0's engine."""

    seq_id: int
    params: SamplingParams
    num_prompt_tokens: int
    output_token_ids: List[int] = field(default_factory=list)
    text: Optional[str] = None  # set when a stop string cut the text (the engine's decision)


@dataclass
class MultimodalLimits:
    """What the server checks of a chat request's images before it is sent (the processor itself
    runs in rank 0's engine): `mm_processor.limits` and `.language_model_only`."""

    limits: Dict[str, Any]
    language_model_only: bool


@dataclass
class StepReport:
    tokens: Dict[int, Tuple[List[int], List[TokenLogprob]]]  # live seq_id -> output tokens, logprobs new since the last report
    finished: List[Tuple[int, RequestOutput, bool]]  # (seq_id, output without text, text was cut)
    has_work: bool
    gauges: Dict[str, int]


# --- rank 0's side (inside its actor) -----------------------------------------------------
class EngineHost:
    """Holds rank 0's engine's live sequences by id for the driver's calls."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.live: Dict[int, Any] = {}
        self.reported: Dict[int, int] = {}  # seq_id -> output tokens the driver has (each report sends only new ones)

    def add(self, prompt: Any, params: List[SamplingParams]) -> List[Union[Tuple[int, int], RequestOutput]]:
        out = []
        for result in self.engine.add_request_group(prompt, params):
            if isinstance(result, RequestOutput):
                out.append(result)
            else:
                self.live[result.seq_id] = result
                self.reported[result.seq_id] = 0
                out.append((result.seq_id, result.num_prompt_tokens))
        return out

    def abort(self, seq_id: int) -> None:
        seq = self.live.pop(seq_id, None)
        self.reported.pop(seq_id, None)
        if seq is not None:
            self.engine.abort(seq)

    def step(self) -> StepReport:
        finished = self.engine.step() if self.engine.has_work() else []
        done = []
        for seq in finished:
            self.reported.pop(seq.seq_id, None)
            if self.live.pop(seq.seq_id, None) is not None:
                done.append((seq.seq_id, self.engine.output(seq, decode=False), seq.text is not None))
        tokens = {}
        for seq_id, seq in self.live.items():
            out = seq.output_token_ids
            count = len(out) - (1 if out and out[-1] < 0 else 0)  # async: a placeholder at the end
            sent = self.reported[seq_id]
            if count > sent:
                logprobs = self.engine.logprobs.get(seq_id, [])[sent:count] if seq.params.logprobs is not None else []
                tokens[seq_id] = (out[sent:count], list(logprobs))
                self.reported[seq_id] = count
        return StepReport(tokens, done, self.engine.has_work(), self.engine.gauges())


# --- the driver's side ----------------------------------------------------------------------
class RemoteEngine:
    """The LLMEngine surface serve/engine_loop.py and serve/app.py use, over `call(method, *args)`
    (RayLauncher.call_rank0: a Ray call to rank 0 that watches every rank while it waits)."""

    def __init__(self, call: Any, tokenizer: Any, info: Dict[str, Any]):
        self._call, self.tokenizer = call, tokenizer
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self.mirrors: Dict[int, MirrorSequence] = {}
        self.outputs: Dict[int, RequestOutput] = {}
        self.logprobs: Dict[int, List[TokenLogprob]] = {}
        self._gauges: Dict[str, int] = info["gauges"]
        self.mm_processor: Optional[MultimodalLimits] = info["mm_limits"]  # None: the model takes no images
        self._has_work = False

    def request_problem(self, token_ids: List[int], params: SamplingParams) -> Optional[str]:
        return request_problem(token_ids, params, self.max_model_len, self.vocab_size)

    def add_request_group(self, prompt: Any, params: List[SamplingParams]) -> List[Union[MirrorSequence, RequestOutput]]:
        out = []
        for p, result in zip(params, self._call("serve_add", prompt, list(params))):
            if isinstance(result, RequestOutput):
                out.append(result)
                continue
            seq_id, num_prompt_tokens = result
            mirror = self.mirrors[seq_id] = MirrorSequence(seq_id, p, num_prompt_tokens)
            out.append(mirror)
            self._has_work = True
        return out

    def abort(self, seq: MirrorSequence) -> None:
        self.mirrors.pop(seq.seq_id, None)
        self._call("serve_abort", seq.seq_id)

    def has_work(self) -> bool:
        return self._has_work

    def gauges(self) -> Dict[str, int]:
        """As of the last step (what /metrics shows)."""
        return self._gauges

    def step(self) -> List[MirrorSequence]:
        report: StepReport = self._call("serve_step")
        self._has_work, self._gauges = report.has_work, report.gauges
        for seq_id, (tokens, logprobs) in report.tokens.items():
            mirror = self.mirrors.get(seq_id)
            if mirror is not None:
                mirror.output_token_ids.extend(tokens)
                self.logprobs.setdefault(seq_id, []).extend(logprobs)
        finished = []
        for seq_id, output, cut in report.finished:
            mirror = self.mirrors.pop(seq_id, None)
            if mirror is None:
                continue
            mirror.output_token_ids = list(output.token_ids)
            mirror.text = output.text if cut else None
            self.outputs[seq_id] = output
            finished.append(mirror)
        return finished

    def output(self, seq: MirrorSequence, decode: bool = False) -> RequestOutput:
        self.logprobs.pop(seq.seq_id, None)
        return self.outputs.pop(seq.seq_id)

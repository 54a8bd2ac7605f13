"""The engine on a thread of its own, fed by HTTP handlers: continuous batching across requests.

Handlers tokenize on their side, then `submit` token ids with a Handle; the loop admits whatever
arrived, runs one engine step while there is work, and pushes Events into each handle's asyncio
queue: the tokens so far after each step for a streaming request, the RequestOutput when a
request ends. A step's Events cross to the handlers' event loop in one call (one wake-up of that
loop, not one per request: at 256 streams the per-request wake-ups cost more than the step). A
handle that `abort`s (its client left) is dropped after the step in flight. If the loop itself ever dies, every handle gets an
error, `dead` holds the cause, and `on_death` runs (the server then exits non-zero).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from framework.engine.llm_engine import LLMEngine
from framework.engine.outputs import RequestOutput, TokenLogprob
from framework.engine.sampling_params import SamplingParams
from framework.engine.sequence import Sequence
from framework.serve.metrics import StepFigures

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how long an idle loop sleeps on the inbox before checking for shutdown


@dataclass
class Event:
    token_ids: List[int]  # every output token so far
    logprobs: List[TokenLogprob] = field(default_factory=list)  # every one so far, if asked for
    output: Optional[RequestOutput] = None  # set on the last event of a request
    decode_text: bool = False  # the output's text is for the handler to decode (no stop string cut it)
    error: Optional[str] = None  # the loop died: no output will come


class LoopSink:
    """Where the Events of handlers on one asyncio event loop go: into their queues, through that
    loop (thread-safe). Sinks of one event loop are equal, so a step's Events for it are one call."""

    def __init__(self, event_loop: asyncio.AbstractEventLoop):
        self.event_loop = event_loop

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoopSink) and other.event_loop is self.event_loop

    def __hash__(self) -> int:
        return id(self.event_loop)

    def send(self, items: List[Tuple["Handle", Event]]) -> None:
        try:
            self.event_loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass


def _put_all(items: List[Tuple["Handle", Event]]) -> None:
    for handle, event in items:
        handle.events.put_nowait((handle.index, event))


class Handle:
    """One engine request (one choice of an HTTP request) seen from its handler. Its Events go
    into `events` as (index, Event): the choices of one HTTP request share one queue."""

    def __init__(self, prompt_token_ids: List[int], prompt: Optional[str], params: SamplingParams, stream: bool,
                 events: "asyncio.Queue[Tuple[int, Event]]", index: int = 0,
                 multi_modal_data: Optional[Dict[str, Any]] = None, processed: Any = None):
        self.prompt = {"prompt_token_ids": prompt_token_ids, "prompt": prompt}
        if processed is not None:  # images processed in the handler's worker thread (placeholders expanded)
            self.prompt["processed"] = processed
        elif multi_modal_data:  # images: processed by the engine (rank 0's, at TP > 1)
            self.prompt["multi_modal_data"] = multi_modal_data
        self.params, self.stream, self.events, self.index = params, stream, events, index
        self.sink: Any = LoopSink(asyncio.get_running_loop())
        self.arrival = time.perf_counter()
        # the engine thread's side
        self.seq: Optional[Sequence] = None
        self.num_seen = 0  # output tokens already reported (metrics) or pushed (stream)
        self.last_token_time = 0.0

    def push(self, event: Event) -> None:
        deliver([(self, event)])


def deliver(batch: List[Tuple[Any, Event]]) -> None:
    """Each Event to its handle's sink: one send per sink."""
    by_sink: Dict[Any, List[Tuple[Any, Event]]] = {}
    for handle, event in batch:
        by_sink.setdefault(handle.sink, []).append((handle, event))
    for sink, items in by_sink.items():
        sink.send(items)


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: Any = None):
        # metrics: anything with record_step(StepFigures) (ServeMetrics, or the bridge to a front process)
        self.engine, self.metrics = engine, metrics
        self.inbox: "queue.Queue[tuple]" = queue.Queue()
        self.active: Dict[int, Handle] = {}  # seq_id -> handle of every admitted, unfinished request
        self.figures = StepFigures()  # since the last report to `metrics` (any object with record_step)
        self.stopped = threading.Event()
        self.dead: Optional[BaseException] = None
        self.on_death: Callable[[BaseException], None] = lambda exc: None  # set it before start()
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # --- the handlers' side (any thread) -----------------------------------------------------
    def submit(self, handles: List[Handle]) -> None:
        """Handles of one prompt (the n choices of a request): its KV is computed once for all."""
        if self.dead is not None:
            for handle in handles:
                handle.push(Event([], error=f"the engine loop died: {self.dead}"))
            return
        self.inbox.put(("add", handles))

    def abort(self, handle: Handle) -> None:
        self.inbox.put(("abort", handle))

    def shutdown(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.dead is None and self.thread.is_alive()

    # --- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                self._drain_inbox(block=not self.engine.has_work())
                if self.engine.has_work():
                    finished = self.engine.step()  # a request's failure is its own (LLMEngine.step)
                    self._after_step(finished)
        except BaseException as exc:  # a bug in the loop itself: nothing will be served any more
            log.exception("the engine loop died")
            self.dead = exc
            # said before the requests' errors: a client told "the engine loop died" then finds
            # /health at 503 (with a front process the two travel in this order on one pipe)
            self.on_death(exc)
            for handle in list(self.active.values()):
                handle.push(Event([], error=f"the engine loop died: {type(exc).__name__}: {exc}"))
            self._fail_inbox(exc)
            self.active.clear()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, what = item
            self._add(what) if kind == "add" else self._abort(what)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _add(self, handles: List[Handle]) -> None:
        results = self.engine.add_request_group(handles[0].prompt, [h.params for h in handles])
        for handle, result in zip(handles, results):
            if isinstance(result, RequestOutput):  # refused: its error, at once
                handle.push(Event([], output=result))
                continue
            handle.seq = result
            self.active[result.seq_id] = handle
        if not isinstance(results[0], RequestOutput):
            self.figures.prompt_tokens += results[0].num_prompt_tokens  # computed once for the group

    def _abort(self, handle: Handle) -> None:
        seq = handle.seq
        if seq is None or self.active.pop(seq.seq_id, None) is None:
            return  # finished already (or never admitted)
        self.engine.abort(seq)
        self.figures.finish_reasons.append("abort")

    def _after_step(self, finished: List[Sequence]) -> None:
        now = time.perf_counter()
        ended = {seq.seq_id for seq in finished}
        batch: List[Tuple[Handle, Event]] = []
        step = self.figures
        for seq_id, handle in self.active.items():  # a finished one's text comes with its output (stop strings cut)
            event = self._new_tokens(handle, now, step, push=seq_id not in ended)
            if event is not None:
                batch.append((handle, event))
        for seq in finished:
            handle = self.active.pop(seq.seq_id, None)
            if handle is None:
                continue
            decode_text = seq.text is None and self.engine.tokenizer is not None
            output = self.engine.output(seq, decode=False)  # detokenized by its handler, off this thread
            batch.append((handle, Event(list(output.token_ids), list(output.outputs[0].logprobs or []),
                                        output=output, decode_text=decode_text)))
            step.finish_reasons.append(output.finish_reason or "unknown")
        deliver(batch)
        if self.metrics is not None:
            self.metrics.record_step(step)
        self.figures = StepFigures()

    def _new_tokens(self, handle: Handle, now: float, step: "StepFigures", push: bool) -> Optional[Event]:
        """The handle's Event for this step (None: nothing new, or not streamed); its figures go to `step`."""
        seq = handle.seq
        tokens = seq.output_token_ids
        count = len(tokens) - (1 if tokens and tokens[-1] < 0 else 0)  # async: a placeholder at the end
        new = count - handle.num_seen
        if new <= 0:
            return None
        step.generation_tokens += new
        if handle.num_seen == 0:
            step.ttft.append(now - handle.arrival)
        else:
            step.itl.extend([(now - handle.last_token_time) / new] * new)
        handle.num_seen, handle.last_token_time = count, now
        if not (handle.stream and push):
            return None
        logprobs = list(self.engine.logprobs.get(seq.seq_id, [])) if seq.params.logprobs is not None else []
        return Event(tokens[:count], logprobs)

    def _fail_inbox(self, exc: BaseException) -> None:
        while True:
            try:
                kind, handle = self.inbox.get_nowait()
            except queue.Empty:
                return
            for handle in (handle if kind == "add" else []):
                handle.push(Event([], error=f"the engine loop died: {type(exc).__name__}: {exc}"))

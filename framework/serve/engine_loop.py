"""The engine on a thread of its own, fed by HTTP handlers: continuous batching across requests.

Handlers `submit` a request and wait on its future; the loop admits whatever arrived, runs one
engine step while there is work, and resolves the futures of finished requests. A request the
engine refuses (bad prompt or settings) resolves at once with its error; the others go on.
A streaming request also hands in a Stream, which gets its text piece by piece after each step.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Dict, List, Optional, Sequence as Seq, Tuple

from framework.engine.llm_engine import LLMEngine
from framework.engine.outputs import RequestOutput
from framework.engine.sampling_params import SamplingParams
from framework.engine.sequence import Sequence
from framework.serve.text_stream import TextStream

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how long an idle loop sleeps on the inbox before checking for shutdown


class Stream:
    """A streaming request's channel to its handler. `deltas` gets "" once the request is
    admitted (None instead if it was refused), then text deltas, then None at the end; the
    request's future is resolved before that None. The handler sets `cancelled` if its client
    goes away, and the loop aborts the request after the step in flight."""

    def __init__(self, stop: Seq[str]):
        self.deltas: "queue.Queue[Optional[str]]" = queue.Queue()
        self.cancelled = threading.Event()
        self.text = TextStream(stop)  # the loop's side: what has been sent so far


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.inbox: "queue.Queue[Tuple[Any, SamplingParams, Future, Optional[Stream]]]" = queue.Queue()
        self.pending: Dict[int, Future] = {}  # seq_id -> the future its handler waits on
        self.streams: Dict[int, Tuple[Sequence, Stream]] = {}  # seq_id -> a streaming request's channel
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    def submit(self, prompt: Any, params: SamplingParams, stream: Optional[Stream] = None) -> "Future[RequestOutput]":
        future: "Future[RequestOutput]" = Future()
        self.inbox.put((prompt, params, future, stream))
        return future

    def shutdown(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def _admit(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            self._admit_one(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _admit_one(self, prompt: Any, params: SamplingParams, future: Future, stream: Optional[Stream]) -> None:
        result = self.engine.add_request(prompt, params)
        if isinstance(result, RequestOutput):  # refused: its error, at once
            future.set_result(result)
            if stream is not None:
                stream.deltas.put(None)  # its handler answers 400, as without streaming
            return
        self.pending[result.seq_id] = future
        if stream is not None:
            self.streams[result.seq_id] = (result, stream)
            stream.deltas.put("")  # admitted: its handler may start the event stream

    def _run(self) -> None:
        while not self.stopped.is_set():
            self._admit(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                for seq in self.engine.step():
                    self._finish(seq)
                self._stream_new_text()
            except Exception as exc:  # an engine bug: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(exc)

    def _finish(self, seq: Sequence) -> None:
        output = self.engine.output(seq)
        _, stream = self.streams.pop(seq.seq_id, (None, None))
        if stream is not None:
            stream.deltas.put(stream.text.delta(output.text, final=True))
        self.pending.pop(seq.seq_id).set_result(output)
        if stream is not None:
            stream.deltas.put(None)

    def _stream_new_text(self) -> None:
        for seq_id, (seq, stream) in list(self.streams.items()):
            if stream.cancelled.is_set():  # its client left: stop spending steps on it
                self.engine.abort(seq)
                del self.streams[seq_id]
                self.pending.pop(seq_id).cancel()
                continue
            delta = stream.text.delta(self._text_so_far(seq))
            if delta:
                stream.deltas.put(delta)

    def _text_so_far(self, seq: Sequence) -> str:
        if self.engine.tokenizer is None:
            return ""
        # with async scheduling the newest token may still be a placeholder (< 0)
        tokens: List[int] = [t for t in seq.output_token_ids if t >= 0]
        return self.engine.tokenizer.decode(tokens, skip_special_tokens=True)  # as engine.output decodes

    def _fail_all(self, exc: Exception) -> None:
        self.engine.clear()
        for future in self.pending.values():
            future.set_exception(exc)
        for _, stream in self.streams.values():
            stream.deltas.put(None)  # after the future, so its handler finds the exception there
        self.pending.clear()
        self.streams.clear()

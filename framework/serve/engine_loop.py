"""The engine on a thread of its own, fed by HTTP handlers: continuous batching across requests.

Handlers `submit` a request and wait on its future; the loop admits whatever arrived, runs one
engine step while there is work, and resolves the futures of finished requests. A request the
engine refuses (bad prompt or settings) resolves at once with its error; the others go on.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Dict, Tuple

from framework.engine.llm_engine import LLMEngine
from framework.engine.outputs import RequestOutput
from framework.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how long an idle loop sleeps on the inbox before checking for shutdown


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.inbox: "queue.Queue[Tuple[Any, SamplingParams, Future]]" = queue.Queue()
        self.pending: Dict[int, Future] = {}  # seq_id -> the future its handler waits on
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    def submit(self, prompt: Any, params: SamplingParams) -> "Future[RequestOutput]":
        future: "Future[RequestOutput]" = Future()
        self.inbox.put((prompt, params, future))
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
            prompt, params, future = item
            result = self.engine.add_request(prompt, params)
            if isinstance(result, RequestOutput):  # refused: its error, at once
                future.set_result(result)
            else:
                self.pending[result.seq_id] = future
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _run(self) -> None:
        while not self.stopped.is_set():
            self._admit(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                finished = self.engine.step()
            except Exception as exc:  # an engine bug: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for seq in finished:
                self.pending.pop(seq.seq_id).set_result(self.engine.output(seq))

    def _fail_all(self, exc: Exception) -> None:
        self.engine.clear()
        for future in self.pending.values():
            future.set_exception(exc)
        self.pending.clear()

"""The OpenAI-compatible server: the Starlette app of app.py on uvicorn (HTTP/1.1, keep-alive,
chunked streaming), with the engine loop on its own thread.

With `task.frontend_process` (the default) uvicorn and the app run in a child process
(serve/front_process.py), so HTTP work never holds the lock the engine's host loop needs;
otherwise on a thread of this process. Either way the caller's thread keeps the signals: `drain()`
(what task=serve's SIGTERM handler calls) refuses new requests, lets in-flight ones finish for up
to `drain_s` seconds, cancels what is left, then stops the engine loop. If the engine loop dies,
the server stops by itself and `failed` says why (task=serve then exits non-zero).
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Dict, Optional, Tuple

import uvicorn

from framework.config.schema import TaskConfig
from framework.llm import LLM
from framework.serve.app import ServeState, build_app
from framework.serve.engine_loop import EngineLoop
from framework.serve.front_process import FrontBridge, FrontSpec
from framework.serve.metrics import ServeMetrics, measured_figures

log = logging.getLogger(__name__)
DEATH_GRACE_S = 1.0  # after the engine loop dies, how long /health answers 503 before the server stops
LISTEN_BACKLOG = 2048  # connections the kernel queues before accept: a burst of clients is not reset


class OpenAIServer:
    def __init__(self, llm: LLM, task: TaskConfig):
        # the engine itself, or at TP > 1 rank 0's engine in its Ray actor, one call a step
        engine = llm.launcher.serving_engine(llm.tokenizer)
        self.llm, self.task = llm, task
        self.failed: Optional[BaseException] = None
        self.loop = EngineLoop(engine)
        self.loop.on_death = self._on_engine_death
        measured = lambda: measured_figures(llm.stats()["ranks"][0])  # noqa: E731
        if task.frontend_process:
            spec = FrontSpec(task.host, task.port, LISTEN_BACKLOG, llm.config.model.path, engine.max_model_len,
                             engine.vocab_size, engine.tokenizer, engine.mm_processor, llm.plan, task.api_key,
                             list(task.cors_origins), task.max_body_bytes, task.drain_s, DEATH_GRACE_S)
            self.front: Optional[FrontBridge] = FrontBridge(self.loop, spec, measured())
            self.loop.metrics = self.front  # a step's figures go to the front's /metrics
            self._address = self.front.address
            self.loop.start()
            return
        self.front = None
        self.metrics = ServeMetrics(engine, llm.plan, measured)
        self.loop.metrics = self.metrics
        self.state = ServeState(self.loop, engine.tokenizer, llm.config.model.path, engine.max_model_len,
                                self.metrics, task.api_key, list(task.cors_origins), task.max_body_bytes)
        self.socket = socket.socket(socket.AF_INET6 if ":" in task.host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((task.host, task.port))
        self.socket.listen(LISTEN_BACKLOG)
        self._address = self.socket.getsockname()[:2]
        config = uvicorn.Config(build_app(self.state), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=task.drain_s, timeout_keep_alive=30)
        self.uvicorn = uvicorn.Server(config)
        self.loop.start()
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                       name="http", daemon=True)
        self.thread.start()

    @property
    def address(self) -> Tuple[str, int]:
        return self._address

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Until the HTTP server has stopped (drain, or the engine loop died); False on timeout."""
        if self.front is not None:
            stopped = self.front.wait(timeout)
            if stopped and self.front.crashed and self.failed is None:  # so that task=serve exits non-zero
                self.failed = RuntimeError(f"the HTTP front process exited with code {self.front.process.exitcode}")
            return stopped
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def drain(self) -> None:
        """No new requests (503, and the listening socket closes); in-flight ones finish within
        task.drain_s, then the rest are cancelled (and aborted in the engine)."""
        if self.front is not None:
            self.front.drain()
            return
        self.state.draining = True
        self.uvicorn.should_exit = True

    def shutdown(self) -> None:
        self.drain()
        self.wait(self.task.drain_s + 10)
        if self.front is not None:
            self.front.stop()
        self.loop.shutdown()

    def _on_engine_death(self, exc: BaseException) -> None:
        """/health says 503 for a moment (a balancer stops sending here), then the server stops."""
        self.failed = exc
        if self.front is not None:
            self.front.engine_died(f"{type(exc).__name__}: {exc}")
            return
        timer = threading.Timer(DEATH_GRACE_S, lambda: setattr(self.uvicorn, "should_exit", True))
        timer.daemon = True
        timer.start()

    def summary(self) -> Dict[str, Any]:
        """The serving figures for metrics.json (the front's, sent as it stopped)."""
        figures = (self.front.summary or {}) if self.front is not None else self.metrics.summary()
        return {"serve": {**figures, "failed": None if self.failed is None else
                          f"{type(self.failed).__name__}: {self.failed}"}}

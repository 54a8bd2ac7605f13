"""The HTTP front in a process of its own, so that it never waits on the engine for Python's lock.

At hundreds of streams the front's work (a JSON chunk and a socket write a stream a step, new
requests parsed) takes as much interpreter time as the engine's host loop; in one process the
two take turns and the device idles between steps. With `task.frontend_process` the engine loop
(serve/engine_loop.py) stays in the engine's process and uvicorn with the Starlette app runs in a
child, joined by one pipe:

    front  -> engine   ("ready", address) once; ("add", [(key, prompt, params, stream)]) a request,
                       its choices together; ("abort", key); ("summary", figures) when it stops
    engine -> front    ("events", [(key, Event)]) a step; ("figures", StepFigures, gauges) a step;
                       ("measured", figures) once (memory measured after start-up, beside the
                       plan's on /metrics); ("dead", why); ("drain",)

Events cross as deltas (the tokens and logprobs new since the key's last Event); the front adds
them up on its event loop, so its handlers see what they would see in one process.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from framework.engine.llm_engine import request_problem
from framework.engine.sampling_params import SamplingParams
from framework.serve.engine_loop import EngineLoop, Event
from framework.serve.metrics import StepFigures

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0  # the child imports the serving stack and binds its socket


@dataclass
class FrontSpec:
    """What the child builds its app from (all of it crosses the pipe once, pickled)."""
    host: str
    port: int
    backlog: int
    model: str  # the id clients name
    max_model_len: int
    vocab_size: int
    tokenizer: Any
    mm_processor: Any  # a MultimodalProcessor (the child processes images), MultimodalLimits, or None
    plan: Any
    api_key: Optional[str] = None
    cors_origins: List[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    drain_s: float = 30.0
    death_grace_s: float = 1.0


# --- the engine's side -------------------------------------------------------------------------
class RemoteHandle:
    """A front's request as the engine loop sees it (the fields EngineLoop reads and writes)."""

    def __init__(self, key: int, prompt: Dict[str, Any], params: SamplingParams, stream: bool, sink: "FrontBridge"):
        self.key, self.prompt, self.params, self.stream, self.sink = key, prompt, params, stream, sink
        self.arrival = time.perf_counter()
        self.seq: Any = None
        self.num_seen = 0
        self.last_token_time = 0.0
        self.sent_tokens = 0  # tokens and logprobs the front has of this request
        self.sent_logprobs = 0

    def push(self, event: Event) -> None:
        self.sink.send([(self, event)])


class FrontBridge:
    """Starts the front, feeds its requests to the engine loop, and is the loop's sink for their
    Events and its metrics object (`record_step`)."""

    def __init__(self, loop: EngineLoop, spec: FrontSpec, measured: Dict[str, float]):
        self.loop = loop
        context = multiprocessing.get_context("spawn")  # never fork a process that holds a GPU context
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=serve_front, args=(child_conn, spec), name="http-front", daemon=True)
        self.process.start()
        child_conn.close()
        self.send_lock = threading.Lock()  # the engine thread and the reader both send
        self.handles: Dict[int, RemoteHandle] = {}
        self.summary: Optional[Dict[str, Any]] = None  # sent by the front as it stops in order
        self.address = self._wait_ready()
        self._send(("measured", measured))
        self.reader = threading.Thread(target=self._read, name="front-bridge", daemon=True)
        self.reader.start()

    def _wait_ready(self) -> Tuple[str, int]:
        if not self.conn.poll(START_TIMEOUT_S):
            self.process.kill()
            raise RuntimeError(f"the HTTP front did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, what = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the HTTP front exited while starting (exit code {self.process.exitcode})") from None
        if kind != "ready":  # ("error", message): it could not bind, say
            raise RuntimeError(f"the HTTP front could not start: {what}")
        return what

    # the engine thread
    def send(self, items: List[Tuple[RemoteHandle, Event]]) -> None:
        out = []
        for handle, event in items:
            delta = replace(event, token_ids=event.token_ids[handle.sent_tokens:],
                            logprobs=event.logprobs[handle.sent_logprobs:])
            handle.sent_tokens, handle.sent_logprobs = len(event.token_ids), len(event.logprobs)
            out.append((handle.key, delta))
            if event.output is not None or event.error is not None:  # its last Event
                self.handles.pop(handle.key, None)
        self._send(("events", out))

    def record_step(self, figures: StepFigures) -> None:
        self._send(("figures", figures, self.loop.engine.gauges()))

    def _send(self, message: tuple) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):  # the front is gone; wait() reports it
                pass

    # the reader thread
    def _read(self) -> None:
        while True:
            try:
                kind, *what = self.conn.recv()
            except (EOFError, OSError):
                return  # the front stopped
            if kind == "add":
                handles = [RemoteHandle(key, prompt, params, stream, self) for key, prompt, params, stream in what[0]]
                for handle in handles:
                    self.handles[handle.key] = handle
                self.loop.submit(handles)
            elif kind == "abort":
                handle = self.handles.pop(what[0], None)
                if handle is not None:
                    self.loop.abort(handle)
            elif kind == "summary":
                self.summary = what[0]

    # the caller's
    def drain(self) -> None:
        self._send(("drain",))

    def engine_died(self, why: str) -> None:
        self._send(("dead", why))

    def wait(self, timeout: Optional[float]) -> bool:
        self.process.join(timeout)
        if self.process.is_alive():
            return False
        self.reader.join(5)  # its last message (the summary) read
        return True

    @property
    def crashed(self) -> bool:
        """The front's process ended without stopping in order (killed, out of memory, a bug)."""
        return self.process.exitcode is not None and self.summary is None

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# --- the front's side (the child process) ------------------------------------------------------
class FrontEngine:
    """What app.py and the metrics read of `state.loop.engine`, answered without the engine."""

    def __init__(self, spec: FrontSpec):
        self.tokenizer, self.mm_processor = spec.tokenizer, spec.mm_processor
        self.max_model_len, self.vocab_size = spec.max_model_len, spec.vocab_size
        self.latest_gauges = {"running": 0, "waiting": 0, "free_blocks": 0, "num_blocks": 1, "preemptions": 0}

    def request_problem(self, token_ids: List[int], params: SamplingParams) -> Optional[str]:
        return request_problem(token_ids, params, self.max_model_len, self.vocab_size)

    def gauges(self) -> Dict[str, int]:
        return self.latest_gauges


class FrontLoop:
    """EngineLoop's surface for app.py (submit, abort, alive, engine), over the pipe."""

    def __init__(self, conn: Any, engine: FrontEngine, event_loop: asyncio.AbstractEventLoop):
        self.conn, self.engine, self.event_loop = conn, engine, event_loop
        self.metrics: Any = None
        self.measured: Dict[str, float] = {}
        self.dead: Optional[str] = None
        self.on_drain: Callable[[], None] = lambda: None
        self.on_death: Callable[[], None] = lambda: None
        self.handles: Dict[int, Tuple[Any, List[int], list]] = {}  # key -> (Handle, tokens, logprobs) so far
        self.next_key = 0

    @property
    def alive(self) -> bool:
        return self.dead is None

    def submit(self, handles: List[Any]) -> None:  # on the event loop
        if self.dead is not None:
            for handle in handles:
                handle.events.put_nowait((handle.index, Event([], error=self.dead)))
            return
        batch = []
        for handle in handles:
            key, self.next_key = self.next_key, self.next_key + 1
            handle.key = key
            self.handles[key] = (handle, [], [])
            batch.append((key, handle.prompt, handle.params, handle.stream))
        self.conn.send(("add", batch))

    def abort(self, handle: Any) -> None:
        if self.handles.pop(getattr(handle, "key", None), None) is not None:
            self.conn.send(("abort", handle.key))

    def read(self) -> None:
        """The reader thread: each message is handled on the event loop, in order."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the engine's process is gone
                message = ("dead", "the engine process exited")
            self.event_loop.call_soon_threadsafe(self._handle, message)
            if message[0] == "dead":
                return

    def _handle(self, message: tuple) -> None:
        kind, *what = message
        if kind == "events":
            for key, event in what[0]:
                self._deliver(key, event)
        elif kind == "figures":
            self.metrics.record_step(what[0])
            self.engine.latest_gauges = what[1]
        elif kind == "measured":
            self.measured = what[0]
        elif kind == "drain":
            self.on_drain()
        elif kind == "dead" and self.dead is None:
            self.dead = f"the engine loop died: {what[0]}"
            for key in list(self.handles):
                self._deliver(key, Event([], error=self.dead))
            self.on_death()

    def _deliver(self, key: int, event: Event) -> None:
        entry = self.handles.get(key)
        if entry is None:
            return  # aborted: its client left
        handle, tokens, logprobs = entry
        if event.output is not None or event.error is not None:
            del self.handles[key]
        tokens.extend(event.token_ids)  # a delta: the handler expects every token so far
        logprobs.extend(event.logprobs)
        handle.events.put_nowait((handle.index, replace(event, token_ids=tokens, logprobs=logprobs)))


def serve_front(conn: Any, spec: FrontSpec) -> None:
    """The child process: bind, build the app, serve until drained or the engine is gone."""
    import signal

    import uvicorn
    # The engine's process decides when to stop (it forwards SIGTERM as "drain"). A signal sent to
    # the whole group (Ctrl-C, `timeout`) still makes uvicorn drain, but uvicorn re-raises it once
    # stopped: ignored here, so the summary below is still sent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    from framework.serve.app import ServeState, build_app
    from framework.serve.metrics import ServeMetrics
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.host, spec.port))
        sock.listen(spec.backlog)
    except OSError as exc:
        conn.send(("error", f"{spec.host}:{spec.port}: {exc}"))
        return

    async def main() -> None:
        loop = FrontLoop(conn, FrontEngine(spec), asyncio.get_running_loop())
        metrics = ServeMetrics(loop.engine, spec.plan, lambda: loop.measured)
        loop.metrics = metrics
        state = ServeState(loop, spec.tokenizer, spec.model, spec.max_model_len, metrics, spec.api_key,
                           list(spec.cors_origins), spec.max_body_bytes)
        server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False,
                                               lifespan="off", timeout_graceful_shutdown=spec.drain_s,
                                               timeout_keep_alive=30))

        def drain() -> None:
            state.draining = True
            server.should_exit = True
        loop.on_drain = drain
        loop.on_death = lambda: asyncio.get_running_loop().call_later(
            spec.death_grace_s, lambda: setattr(server, "should_exit", True))
        threading.Thread(target=loop.read, name="engine-reader", daemon=True).start()
        conn.send(("ready", sock.getsockname()[:2]))
        try:
            await server.serve(sockets=[sock])
        finally:
            summary = metrics.summary()
            cache = getattr(spec.mm_processor, "cache", None)  # served images are processed (and cached) here
            if cache is not None:
                summary["mm_processor_cache"] = cache.stats.as_dict()
            conn.send(("summary", summary))
    asyncio.run(main())

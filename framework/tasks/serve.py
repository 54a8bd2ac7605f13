"""task=serve: an OpenAI-compatible HTTP server over the engine, until SIGTERM or Ctrl-C.

Either signal drains: new requests are refused, in-flight ones get task.drain_s seconds to
finish, then metrics.json gets the serving figures. If the engine loop dies, or the HTTP front's
process does, the server stops and the run exits non-zero, so a supervisor restarts it.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

from framework.config.schema import FrameworkConfig
from framework.llm import LLM
from framework.serve.server import OpenAIServer
from framework.tasks.metrics import write_metrics

log = logging.getLogger(__name__)
ENGINE_DIED = 1


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    with LLM(cfg) as llm:
        server = OpenAIServer(llm, cfg.task)
        host, port = server.address

        def drain(signum: int, frame) -> None:
            log.info("%s: draining (in-flight requests get up to %.0f s)", signal.Signals(signum).name,
                     cfg.task.drain_s)
            server.drain()
        previous = {sig: signal.signal(sig, drain) for sig in (signal.SIGTERM, signal.SIGINT)}
        print(f"serving {cfg.model.path} at http://{host}:{port}/v1; SIGTERM or Ctrl-C drains and stops", flush=True)
        try:
            while not server.wait(timeout=0.5):  # short waits: the signal handler runs between them
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.shutdown()
            write_metrics(run_dir, {**server.summary(), "stats": llm.stats()})
        if server.failed is not None:
            log.error("the server failed: %s", server.failed)
            return ENGINE_DIED
    return 0

"""task=serve: an OpenAI-compatible HTTP server over the engine, until Ctrl-C."""
from __future__ import annotations

from pathlib import Path

from framework.config.schema import FrameworkConfig
from framework.llm import LLM
from framework.serve.server import OpenAIServer


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    with LLM(cfg) as llm:
        server = OpenAIServer(llm, cfg.task.host, cfg.task.port)
        host, port = server.address
        print(f"serving {cfg.model.path} at http://{host}:{port}/v1 (completions, chat/completions); Ctrl-C stops")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
    return 0

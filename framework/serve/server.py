"""A small OpenAI-compatible HTTP server over one engine (standard library only).

POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. Each handler
thread submits to the EngineLoop and waits, so concurrent requests share engine steps.
Streaming is not supported yet (`stream: true` is a 400).
"""
from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Tuple

from framework.llm import LLM
from framework.serve import openai_api as api
from framework.serve.engine_loop import EngineLoop

log = logging.getLogger(__name__)
CHAT_MAX_TOKENS = 256  # when a chat request names no limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions


class OpenAIServer:
    def __init__(self, llm: LLM, host: str, port: int):
        engine = getattr(llm.launcher, "engine", None)
        if engine is None:
            from framework.config.errors import UserError
            raise UserError("task=serve runs the engine in this process for now: "
                            "parallelism.tensor_parallel_size=1 (launcher=local)")
        self.llm, self.model = llm, llm.config.model.path
        self.loop = EngineLoop(engine)
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True

    @property
    def address(self) -> Tuple[str, int]:
        return self.httpd.server_address[:2]

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.shutdown()

    # --- requests -------------------------------------------------------------------
    def handle(self, path: str, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        try:
            if path == "/v1/completions":
                params = api.sampling_params(body, COMPLETION_MAX_TOKENS)
                prompts = api.completion_prompts(body)
                outputs = [f.result() for f in [self.loop.submit(p, params) for p in prompts]]
                errors = [o.error for o in outputs if o.error]
                return (400, api.error_body(errors[0])) if errors else (200, api.completion_body(outputs, self.model))
            if path == "/v1/chat/completions":
                params = api.sampling_params(body, CHAT_MAX_TOKENS)
                prompt = api.chat_prompt(body, self._apply_chat_template)
                output = self.loop.submit(prompt, params).result()
                return (400, api.error_body(output.error)) if output.error else (200, api.chat_body(output, self.model))
        except api.RequestError as exc:
            return 400, api.error_body(str(exc), exc.param)
        return 404, api.error_body(f"no route {path}")

    def _apply_chat_template(self, messages) -> str:
        tokenizer = self.llm.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise api.RequestError("messages", f"model {self.model} has no chat template; use /v1/completions")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: Dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/health":
                    self._send(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model",
                                                                 "owned_by": "framework"}]})
                else:
                    self._send(404, api.error_body(f"no route {self.path}"))

            def do_POST(self) -> None:  # noqa: N802
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    body = json.loads(self.rfile.read(length) or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("the body must be a JSON object")
                except ValueError as exc:
                    self._send(400, api.error_body(f"invalid JSON body: {exc}"))
                    return
                self._send(*server.handle(self.path, body))

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        return Handler

"""A small OpenAI-compatible HTTP server over one engine (standard library only).

POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. Each handler
thread submits to the EngineLoop and waits, so concurrent requests share engine steps. With
`stream: true` the handler writes server-sent events as the loop hands it text, ending with
`data: [DONE]`; a request refused at admission is still a plain 400.
"""
from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Tuple, Union

from framework.engine.sampling_params import SamplingParams
from framework.llm import LLM
from framework.serve import openai_api as api
from framework.serve.engine_loop import EngineLoop, Stream

log = logging.getLogger(__name__)
CHAT_MAX_TOKENS = 256  # when a chat request names no limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class EventStream:
    chunks: Iterator[Dict[str, Any]]  # each one `data: {json}`, as the engine produces text
    cancel: Callable[[], None]  # the client went away


class OpenAIServer:
    def __init__(self, llm: LLM, host: str, port: int):
        engine = llm.launcher.local_engine()
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
    def handle(self, path: str, body: Dict[str, Any]) -> Tuple[int, Union[Dict[str, Any], EventStream]]:
        try:
            if path == "/v1/completions":
                params = api.sampling_params(body, COMPLETION_MAX_TOKENS)
                prompts = api.completion_prompts(body)
                if api.wants_stream(body) and len(prompts) != 1:
                    raise api.RequestError("prompt", "stream=true takes one prompt")
                if api.wants_stream(body):
                    return self._stream(prompts[0], params, api.completion_chunks, api.include_usage(body))
                outputs = [f.result() for f in [self.loop.submit(p, params) for p in prompts]]
                errors = [o.error for o in outputs if o.error]
                return (400, api.error_body(errors[0])) if errors else (200, api.completion_body(outputs, self.model))
            if path == "/v1/chat/completions":
                params = api.sampling_params(body, CHAT_MAX_TOKENS)
                prompt = api.chat_prompt(body, self._apply_chat_template)
                if api.wants_stream(body):
                    return self._stream(prompt, params, api.chat_chunks, api.include_usage(body))
                output = self.loop.submit(prompt, params).result()
                return (400, api.error_body(output.error)) if output.error else (200, api.chat_body(output, self.model))
        except api.RequestError as exc:
            return 400, api.error_body(str(exc), exc.param)
        return 404, api.error_body(f"no route {path}")

    def _stream(self, prompt: Any, params: SamplingParams, chunks: Callable, usage: bool
                ) -> Tuple[int, Union[Dict[str, Any], EventStream]]:
        stream = Stream(params.stop)
        future = self.loop.submit(prompt, params, stream)
        if stream.deltas.get() is None:  # refused at admission: no stream has started, so a plain 400
            return 400, api.error_body(future.result().error)
        deltas = iter(stream.deltas.get, None)
        return 200, EventStream(chunks(deltas, future.result, self.model, usage), stream.cancelled.set)

    def _apply_chat_template(self, messages) -> str:
        owner = self.llm._chat_template_owner()  # a vision-language model's processor, else the tokenizer
        if owner is None or not getattr(owner, "chat_template", None):
            raise api.RequestError("messages", f"model {self.model} has no chat template; use /v1/completions")
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

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
                status, reply = server.handle(self.path, body)
                if isinstance(reply, EventStream):
                    self._send_events(reply)
                else:
                    self._send(status, reply)

            def _send_events(self, events: EventStream) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()  # HTTP/1.0: the end of the stream is the end of the connection
                    for chunk in _or_error(events.chunks):
                        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):  # the client left: stop generating for it
                    events.cancel()

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        return Handler


def _or_error(chunks: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """The chunks, then an error chunk if the engine failed mid-request: the 200 went out already."""
    try:
        yield from chunks
    except Exception as exc:
        log.exception("a streamed request failed")
        yield {"error": {"message": f"the engine failed: {exc}", "type": "server_error", "param": None,
                         "code": 500}}

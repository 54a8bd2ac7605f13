"""Two small ASGI middlewares: a request-body size limit (413) and an optional API key (401).

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so streamed responses pass through
untouched and a client's disconnect still reaches the route.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, status: int, message: str, kind: str, code: Optional[str],
                     headers: Tuple[Tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, or as soon as a chunked body
    passes the limit (the route never sees it)."""

    def __init__(self, app: App, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0
        started = False

        async def limited_receive() -> Dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, f"the request body is over the limit of {self.max_bytes} bytes "
                         "(task.max_body_bytes)", "invalid_request_error", "request_too_large")


class ApiKey:
    """401 unless `Authorization: Bearer <key>` on the protected path prefixes."""

    def __init__(self, app: App, key: str, protected: Tuple[str, ...]):
        self.app, self.key, self.protected = app, key.encode(), protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not scope["path"].startswith(self.protected):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, b"Bearer " + self.key):
            return await send_error(send, 401, "a valid API key is needed: Authorization: Bearer <task.api_key>",
                                    "authentication_error", "invalid_api_key",
                                    ((b"www-authenticate", b"Bearer"),))
        await self.app(scope, receive, send)

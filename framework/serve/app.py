"""The HTTP routes (Starlette): OpenAI's completions, chat completions and models, plus
/tokenize, /detokenize, /health and /metrics.

Handlers parse bodies with the pydantic models of protocol.py, tokenize off the event loop and
off the engine thread (a thread pool), check what the engine would refuse (a 400 before any
stream starts), then hand one Handle per choice to the EngineLoop and await its Events. A client
that disconnects, streamed or not, aborts its requests.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from framework.engine.detokenizer import IncrementalDecoder
from framework.engine.outputs import RequestOutput
from framework.engine.sampling_params import SamplingParams
from framework.serve import openai_api as api
from framework.serve.engine_loop import EngineLoop, Event, Handle
from framework.serve.metrics import ServeMetrics
from framework.serve.middleware import ApiKey, BodyLimit
from framework.serve.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                      ImagePart, StreamOptions, TextPart, TokenizeRequest)
from framework.serve.text_stream import TextStream

log = logging.getLogger(__name__)
CHAT_MAX_TOKENS = 256  # when a chat request names no limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions
ALIVE_CHECK_S = 1.0  # how often a waiting handler checks that the engine loop still runs
B = TypeVar("B", bound=BaseModel)


@dataclass
class ServeState:
    loop: EngineLoop
    tokenizer: Any
    model: str  # the id clients name
    max_model_len: int
    metrics: ServeMetrics
    api_key: Optional[str] = None
    cors_origins: List[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    draining: bool = False  # SIGTERM: new requests get 503 while in-flight ones finish


class ClientGone(Exception):
    pass


def build_app(state: ServeState) -> Starlette:
    routes = [Route("/v1/completions", _endpoint(state, completions), methods=["POST"]),
              Route("/v1/chat/completions", _endpoint(state, chat_completions), methods=["POST"]),
              Route("/v1/models", _endpoint(state, list_models), methods=["GET"]),
              Route("/v1/models/{model_id:path}", _endpoint(state, get_model), methods=["GET"]),
              Route("/tokenize", _endpoint(state, tokenize), methods=["POST"]),
              Route("/detokenize", _endpoint(state, detokenize), methods=["POST"]),
              Route("/health", _endpoint(state, health), methods=["GET"]),
              Route("/metrics", _endpoint(state, metrics), methods=["GET"])]
    middleware = [Middleware(BodyLimit, max_bytes=state.max_body_bytes)]
    if state.api_key:
        middleware.append(Middleware(ApiKey, key=state.api_key, protected=("/v1/", "/tokenize", "/detokenize")))
    if state.cors_origins:  # outermost, so preflights and error replies carry the CORS headers too
        middleware.append(Middleware(CORSMiddleware, allow_origins=state.cors_origins, allow_methods=["*"],
                                     allow_headers=["*"]))
    return Starlette(routes=routes, middleware=middleware[::-1],
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


def _endpoint(state: ServeState, handler: Callable) -> Callable:
    async def endpoint(request: Request) -> Response:
        try:
            if state.draining and handler is not health and handler is not metrics:
                raise api.RequestError(None, "the server is shutting down", 503, "server_error")
            return await handler(state, request)
        except api.RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the requests were aborted
    return endpoint


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(api.error_body(f"{request.method} {request.url.path}: {exc.detail}", None, kind),
                        status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request %s failed", request.url.path)
    return JSONResponse(api.error_body(f"internal error: {type(exc).__name__}: {exc}", None, "server_error"),
                        status_code=500)


# --- bodies ---------------------------------------------------------------------------------
async def parse(request: Request, model: Type[B]) -> B:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param(error["loc"])
        if error["type"] == "json_invalid":
            raise api.RequestError(None, f"the body is not valid JSON: {error['msg']}") from None
        what = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        raise api.RequestError(param, f"{param}: {what}" if param else what) from None


FIELD_NAMES = {name for body in (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions, TextPart,
                                  ImagePart, TokenizeRequest, DetokenizeRequest) for name in body.model_fields}


def _param(loc: Sequence[Any]) -> Optional[str]:
    """pydantic's error location as the field's name: `stop`, `messages[0].content`, ...
    (union members in the location, like 'str' or 'list[str]', are not fields; an unknown
    field is named as sent)."""
    name = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in FIELD_NAMES or position == 0:
            name += f".{part}" if name else part
    return name or None


def _model_check(state: ServeState, model: Optional[str]) -> None:
    api.check_model(model, state.model)


async def _encode(state: ServeState, prompt: Any) -> Tuple[Optional[str], List[int]]:
    """(text, token ids): tokenized in a worker thread, never on the event loop or engine thread."""
    if isinstance(prompt, list):
        return None, prompt
    if state.tokenizer is None:
        raise api.RequestError("prompt", "this model has no tokenizer: send token ids")
    return prompt, await run_in_threadpool(state.tokenizer.encode, prompt)


def _chat_text(state: ServeState, messages: List[ChatMessage]) -> Tuple[str, List[Any]]:
    """(the chat template's text, the images of its image_url parts in order). An image is read
    here, in a worker thread: one that cannot be is a 400 naming its part."""
    from framework.multimodal.limits import MultimodalInputError, check_counts
    from framework.multimodal.media import load_image
    tokenizer = state.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise api.RequestError("messages", f"model {state.model} has no chat template; use /v1/completions")
    if not messages:
        raise api.RequestError("messages", "messages must not be empty")
    processor = getattr(state.loop.engine, "mm_processor", None)
    plain, images = [], []
    for i, message in enumerate(messages):
        content = message.content
        if not isinstance(content, str):  # a list of parts: text parts join; image parts become placeholders
            if not any(isinstance(part, ImagePart) for part in content):
                content = "".join(part.text for part in content)
            else:
                parts = []
                for j, part in enumerate(content):
                    if isinstance(part, TextPart):
                        parts.append({"type": "text", "text": part.text})
                        continue
                    where = f"messages[{i}].content[{j}]"
                    if processor is None:
                        raise api.RequestError(where, f"model {state.model} takes no images")
                    try:
                        images.append(load_image(part.image_url.get("url"), where))
                    except MultimodalInputError as exc:
                        raise api.RequestError(where, str(exc)) from None
                    parts.append({"type": "image"})
                content = parts
        plain.append({**message.model_dump(exclude_none=True), "content": content})
    if images:
        try:
            check_counts({"image": len(images)}, processor.limits, processor.language_model_only)
        except MultimodalInputError as exc:
            raise api.RequestError("messages", str(exc)) from None
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False), images
    except Exception as exc:  # the template itself refuses (say, roles out of order)
        raise api.RequestError("messages", f"the chat template refused the messages: {exc}") from None


def _process_images(state: ServeState, token_ids: List[int], images: List[Any]) -> Any:
    """The images through the model's processor here, in a worker thread, so the engine's thread
    never waits on image decoding and resizing; None where the processor lives in rank 0's actor
    (TP > 1), which then processes them itself."""
    from framework.multimodal.limits import MultimodalInputError
    processor = state.loop.engine.mm_processor
    if not hasattr(processor, "process"):
        return None
    try:
        return processor.process(token_ids, {"image": images})
    except MultimodalInputError as exc:
        raise api.RequestError("messages", str(exc)) from None


def _refusal(state: ServeState, token_ids: List[int], params: SamplingParams, param: str) -> None:
    problem = state.loop.engine.request_problem(token_ids, params)
    if problem:
        raise api.RequestError("stop_token_ids" if problem.startswith("stop_token_ids") else param, problem)


# --- waiting for the engine ------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already, so only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next(state: ServeState, events: "asyncio.Queue[Tuple[int, Event]]",
                gone: Optional["asyncio.Task[None]"]) -> Tuple[int, Event]:
    if not events.empty():  # the common case under load: no waiting, no task or timer made
        return _settled(state, events.get_nowait())
    while gone is None:  # a stream: Starlette cancels the handler when its client leaves
        try:
            return _settled(state, await asyncio.wait_for(events.get(), ALIVE_CHECK_S))
        except asyncio.TimeoutError:
            if not state.loop.alive:
                return 0, Event([], error="the engine loop died")
    while True:
        getter = asyncio.ensure_future(events.get())
        waiting = {getter} if gone is None else {getter, gone}
        done, _ = await asyncio.wait(waiting, timeout=ALIVE_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return _settled(state, getter.result())
        getter.cancel()
        if gone is not None and gone in done:
            raise ClientGone()
        if not state.loop.alive:
            return 0, Event([], error="the engine loop died")


def _settled(state: ServeState, item: Tuple[int, Event]) -> Tuple[int, Event]:
    index, event = item
    if event.decode_text:  # the engine thread leaves the final decode to us
        event.output.outputs[0].text = state.tokenizer.decode(event.output.token_ids, skip_special_tokens=True)
        event.decode_text = False
    return index, event


def _latest(state: ServeState, first: Tuple[int, Event],
            events: "asyncio.Queue[Tuple[int, Event]]") -> List[Tuple[int, Event]]:
    """`first` and whatever else is queued (settled), keeping per choice only its latest Event: each
    one holds every token so far, so a handler that fell behind sends one chunk for several steps."""
    latest: Dict[int, Event] = {first[0]: first[1]}
    while not events.empty():
        index, event = _settled(state, events.get_nowait())
        if latest.get(index) is None or latest[index].output is None:  # a choice's final Event stays
            latest[index] = event
    return list(latest.items())


class Submitted:
    """The Handles of one HTTP request: submitted together (those of one prompt as a group that
    shares its KV), aborted together unless finished."""

    def __init__(self, state: ServeState, handles: List[Handle], group_size: int):
        self.state, self.handles = state, handles
        self.finished = [False] * len(handles)
        for start in range(0, len(handles), group_size):
            state.loop.submit(handles[start:start + group_size])

    def finish(self, index: int) -> None:
        self.finished[index] = True

    def abort_unfinished(self) -> None:
        for handle, done in zip(self.handles, self.finished):
            if not done:
                self.state.loop.abort(handle)


async def _results(state: ServeState, request: Request, submitted: Submitted,
                   events: "asyncio.Queue[Tuple[int, Event]]") -> List[RequestOutput]:
    gone = asyncio.ensure_future(_disconnected(request))
    outputs: List[Optional[RequestOutput]] = [None] * len(submitted.handles)
    try:
        while not all(submitted.finished):
            index, event = await _next(state, events, gone)
            if event.error is not None:
                raise api.RequestError(None, event.error, 500, "server_error")
            if event.output is not None:
                outputs[index] = event.output
                submitted.finish(index)
    finally:
        gone.cancel()
        submitted.abort_unfinished()
    return outputs  # type: ignore[return-value]


def _engine_error(outputs: Sequence[RequestOutput], param: str) -> None:
    """A request the engine refused at admission (its images, its length) is the client's 400,
    naming `param`; a failure inside a step is the server's 500."""
    failed = [o for o in outputs if o.error]
    if failed and all(o.refused for o in failed):
        raise api.RequestError(param, failed[0].error)
    if failed:
        raise api.RequestError(None, failed[0].error, 500, "server_error")


# --- routes ------------------------------------------------------------------------------
async def completions(state: ServeState, request: Request) -> Response:
    req = await parse(request, CompletionRequest)
    _model_check(state, req.model)
    params = api.sampling_params(req, COMPLETION_MAX_TOKENS)
    prompts = [await _encode(state, p) for p in api.completion_prompts(req)]
    for _, ids in prompts:
        _refusal(state, ids, params[0], "prompt")
    events: "asyncio.Queue[Tuple[int, Event]]" = asyncio.Queue()
    handles = [Handle(ids, text, sp, req.stream, events, i * len(params) + j)
               for i, (text, ids) in enumerate(prompts) for j, sp in enumerate(params)]
    echoes = [_echo_text(state, text, ids) if req.echo else "" for text, ids in prompts for _ in params]
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_stream(state, False, handles, len(params), events, echoes, prompt_tokens, include_usage))
    outputs = await _results(state, request, Submitted(state, handles, len(params)), events)
    _engine_error(outputs, "prompt")
    token_text = _token_text(state)
    choices = []
    for index, (output, echo) in enumerate(zip(outputs, echoes)):
        logprobs = None
        if output.outputs[0].logprobs is not None:
            logprobs = api.completion_logprobs(output.outputs[0].logprobs, token_text, len(echo))
        choices.append(api.completion_choice(index, echo + output.text, output.finish_reason, logprobs))
    usage = api.usage(prompt_tokens, sum(len(o.token_ids) for o in outputs))
    return JSONResponse(api.response_body("text_completion", state.model, choices, usage))


async def chat_completions(state: ServeState, request: Request) -> Response:
    req = await parse(request, ChatCompletionRequest)
    _model_check(state, req.model)
    params = api.sampling_params(req, CHAT_MAX_TOKENS)
    text, images = await run_in_threadpool(_chat_text, state, req.messages)
    _, ids = await _encode(state, text)
    processed = await run_in_threadpool(_process_images, state, ids, images) if images else None
    _refusal(state, ids if processed is None else processed.token_ids, params[0], "messages")
    events: "asyncio.Queue[Tuple[int, Event]]" = asyncio.Queue()
    handles = [Handle(ids, text, sp, req.stream, events, j, {"image": images} if images else None, processed)
               for j, sp in enumerate(params)]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_stream(state, True, handles, len(handles), events, [""] * len(handles), len(ids), include_usage))
    outputs = await _results(state, request, Submitted(state, handles, len(handles)), events)
    _engine_error(outputs, "messages")
    token_text = _token_text(state)
    choices = [api.chat_choice(i, o.text, o.finish_reason,
                               None if o.outputs[0].logprobs is None else
                               api.chat_logprobs(o.outputs[0].logprobs, token_text))
               for i, o in enumerate(outputs)]
    usage = api.usage(len(ids), sum(len(o.token_ids) for o in outputs))
    return JSONResponse(api.response_body("chat.completion", state.model, choices, usage))


def _echo_text(state: ServeState, text: Optional[str], ids: List[int]) -> str:
    if text is not None:
        return text
    return state.tokenizer.decode(ids) if state.tokenizer is not None else ""


def _token_text(state: ServeState) -> Callable[[int], str]:
    tokenizer = state.tokenizer
    return (lambda t: tokenizer.decode([t])) if tokenizer is not None else str


def _sse(batches: AsyncIterator[List[Dict[str, Any]]]) -> StreamingResponse:
    """Server-sent events, one socket write per batch of chunks."""
    async def frames() -> AsyncIterator[bytes]:
        async for batch in batches:
            yield b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in batch)
        yield b"data: [DONE]\n\n"
    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(state: ServeState, chat: bool, handles: List[Handle], group_size: int,
                  events: "asyncio.Queue[Tuple[int, Event]]", echoes: List[str], prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[List[Dict[str, Any]]]:
    """The chunks of a streamed request, choice by choice as their tokens come, in batches (what
    one wake-up of this handler has to send, written to the socket at once). The requests are
    submitted when the response starts (a client gone before then costs nothing); Starlette
    cancels this generator when the client disconnects, and `finally` aborts what is unfinished."""
    head = api.chunk_head(chat, state.model)
    submitted = Submitted(state, handles, group_size)
    texts = [TextStream(h.params.stop) for h in handles]
    sent_logprobs = [0] * len(handles)
    offsets = [len(e) for e in echoes]
    completion_tokens = 0
    decode = (lambda ids: state.tokenizer.decode(ids, skip_special_tokens=True)) if state.tokenizer else (lambda ids: "")
    decoders = [IncrementalDecoder(decode) for _ in handles]
    token_text = _token_text(state)

    def chunk(index: int, text: str, finish_reason: Optional[str], entries=()) -> Dict[str, Any]:
        if chat:
            logprobs = api.chat_logprobs(entries, token_text) if entries else None
            return {**head, "choices": [api.chat_delta(index, {"content": text} if text else {}, finish_reason,
                                                       logprobs)]}
        logprobs = api.completion_logprobs(entries, token_text, offsets[index]) if entries else None
        return {**head, "choices": [api.completion_choice(index, text, finish_reason, logprobs)]}
    try:
        opening = []
        for index, echo in enumerate(echoes):
            if chat:
                opening.append({**head, "choices": [api.chat_delta(index, {"role": "assistant", "content": ""}, None)]})
            elif echo:
                opening.append(chunk(index, echo, None))
        if opening:
            yield opening
        while not all(submitted.finished):
            batch = []
            for index, event in _latest(state, await _next(state, events, None), events):
                if event.error is not None or (event.output is not None and event.output.error):
                    message = event.error or event.output.error
                    yield batch + [{"error": {"message": message, "type": "server_error", "param": None, "code": None}}]
                    return
                final = event.output is not None
                text = event.output.text if final else decoders[index].update(event.token_ids)
                delta = texts[index].delta(text, final=final)
                entries = event.logprobs[sent_logprobs[index]:]
                sent_logprobs[index] = len(event.logprobs)
                if delta or entries:
                    batch.append(chunk(index, delta, None, entries))
                    offsets[index] += sum(len(token_text(e.token_id)) for e in entries)
                if final:
                    completion_tokens += len(event.output.token_ids)
                    submitted.finish(index)
                    batch.append(chunk(index, "", event.output.finish_reason))
            if batch:
                yield batch
        if include_usage:
            yield [{**head, "choices": [], "usage": api.usage(prompt_tokens, completion_tokens)}]
    finally:
        submitted.abort_unfinished()


async def list_models(state: ServeState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(state: ServeState, request: Request) -> Response:
    _model_check(state, request.path_params["model_id"])
    return JSONResponse(_model_card(state))


def _model_card(state: ServeState) -> Dict[str, Any]:
    return {"id": state.model, "object": "model", "created": 0, "owned_by": "framework",
            "max_model_len": state.max_model_len}


async def tokenize(state: ServeState, request: Request) -> Response:
    req = await parse(request, TokenizeRequest)
    _model_check(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise api.RequestError("prompt", "give exactly one of prompt and messages")
    if state.tokenizer is None:
        raise api.RequestError(None, "this model has no tokenizer")
    if req.messages is not None:
        text, _ = await run_in_threadpool(_chat_text, state, req.messages)
        ids = await run_in_threadpool(state.tokenizer.encode, text)  # as chat completions encode it (before images)
    else:
        ids = await run_in_threadpool(state.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})


async def detokenize(state: ServeState, request: Request) -> Response:
    req = await parse(request, DetokenizeRequest)
    _model_check(state, req.model)
    vocab = state.loop.engine.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise api.RequestError("tokens", f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if state.tokenizer is None:
        raise api.RequestError(None, "this model has no tokenizer")
    return JSONResponse({"prompt": await run_in_threadpool(state.tokenizer.decode, req.tokens)})


async def health(state: ServeState, request: Request) -> Response:
    if not state.loop.alive:
        return JSONResponse({"status": "dead", "error": str(state.loop.dead)}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(state: ServeState, request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

"""OpenAI-shaped requests in, engine requests out, and back: completions and chat completions.

Pure functions over JSON bodies, so the HTTP server stays plumbing; a stream is an iterator of
chunks that the server frames as server-sent events. A field of the wrong type or an unsupported
feature is a RequestError naming the field (HTTP 400); values the engine refuses (max_tokens <= 0,
a prompt over max_model_len...) come back as that request's error.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from framework.engine.outputs import RequestOutput
from framework.engine.sampling_params import SamplingParams


class RequestError(ValueError):
    def __init__(self, param: Optional[str], message: str):
        self.param = param
        super().__init__(message)


def error_body(message: str, param: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": 400}}


def _field(body: Dict[str, Any], name: str, kinds: tuple, default: Any) -> Any:
    value = body.get(name, default)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise RequestError(name, f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def sampling_params(body: Dict[str, Any], default_max_tokens: int) -> SamplingParams:
    if _field(body, "n", (int,), 1) != 1:
        raise RequestError("n", "only n=1 is supported")
    stop = _field(body, "stop", (str, list), None) or []
    max_tokens = _field(body, "max_completion_tokens", (int,), None)
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else _field(body, "max_tokens", (int,), default_max_tokens),
        temperature=float(_field(body, "temperature", (int, float), 1.0)),
        top_p=float(_field(body, "top_p", (int, float), 1.0)),
        top_k=_field(body, "top_k", (int,), -1),  # vLLM's extension
        seed=_field(body, "seed", (int,), None),
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(_field(body, "stop_token_ids", (list,), None) or []),  # vLLM's extension
        ignore_eos=bool(_field(body, "ignore_eos", (bool,), False)),  # vLLM's extension
    )


def wants_stream(body: Dict[str, Any]) -> bool:
    return bool(_field(body, "stream", (bool,), False))


def include_usage(body: Dict[str, Any]) -> bool:
    """stream_options.include_usage: one more chunk at the end, with usage and no choices."""
    options = _field(body, "stream_options", (dict,), None) or {}
    return bool(_field(options, "include_usage", (bool,), False))


def completion_prompts(body: Dict[str, Any]) -> List[Any]:
    """`prompt`: a string, a list of token ids, or a list of strings (one choice each)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise RequestError("prompt", "prompt must be a string, a list of strings or a list of token ids")


def chat_prompt(body: Dict[str, Any], apply_template: Callable[[List[Dict[str, Any]]], str]) -> Any:
    """The prompt text, or {prompt, multi_modal_data} when the messages carry image or video parts
    (`image_url` with a data: URL, a local path or file://; `video` frames)."""
    from framework.multimodal.chat import split_chat_messages
    from framework.multimodal.limits import MultimodalInputError
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
            for m in messages):
        raise RequestError("messages", "messages must be a non-empty list of {role, content}, content a string "
                                       "or a list of parts")
    try:
        template, media = split_chat_messages(messages)
    except MultimodalInputError as exc:
        raise RequestError("messages", str(exc)) from None
    text = apply_template(template)
    return {"prompt": text, "multi_modal_data": media} if media else text


def _usage(outputs: List[RequestOutput]) -> Dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(outputs: List[RequestOutput], model: str) -> Dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "usage": _usage(outputs),
            "choices": [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                        for i, o in enumerate(outputs)]}


def chat_body(output: RequestOutput, model: str) -> Dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": _usage([output]),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                         "finish_reason": output.finish_reason}]}


# --- streaming: `deltas` is the request's text piece by piece; `result()` its final output ---
def completion_chunks(deltas: Iterable[str], result: Callable[[], RequestOutput], model: str,
                      usage: bool) -> Iterator[Dict[str, Any]]:
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model}

    def choice(text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _chunks(head, choice, deltas, result, usage)


def chat_chunks(deltas: Iterable[str], result: Callable[[], RequestOutput], model: str,
                usage: bool) -> Iterator[Dict[str, Any]]:
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}

    def choice(text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
    yield from _chunks(head, choice, deltas, result, usage)


def _chunks(head: Dict[str, Any], choice: Callable[[str, Optional[str]], Dict[str, Any]], deltas: Iterable[str],
            result: Callable[[], RequestOutput], usage: bool) -> Iterator[Dict[str, Any]]:
    for text in deltas:
        if text:
            yield {**head, "choices": [choice(text, None)]}
    output = result()
    yield {**head, "choices": [choice("", output.finish_reason)]}
    if usage:
        yield {**head, "choices": [], "usage": _usage([output])}

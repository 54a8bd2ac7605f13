"""OpenAI-shaped requests in, engine requests out, and back: completions and chat completions.

Pure functions, so the HTTP app stays plumbing. A value the engine would refuse, or a feature we
do not implement, is a RequestError naming the field (HTTP 400), raised before anything is queued.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from framework.engine.outputs import TokenLogprob
from framework.engine.sampling_params import ParamError, SamplingParams
from framework.serve.protocol import ChatCompletionRequest, CompletionRequest, refused_fields

MAX_N = 128  # choices per request: each is a sequence in the engine
SEED_SPAN = 2 ** 64


class RequestError(ValueError):
    """An HTTP error with OpenAI's body; `param` names the field at fault."""

    def __init__(self, param: Optional[str], message: str, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        self.param, self.status, self.kind, self.code = param, status, kind, code
        super().__init__(message)

    def body(self) -> Dict[str, Any]:
        return error_body(str(self), self.param, self.kind, self.code)


def error_body(message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
               code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


Request = Union[CompletionRequest, ChatCompletionRequest]


def sampling_params(req: Request, default_max_tokens: int) -> List[SamplingParams]:
    """One SamplingParams per choice (n of them: seeded ones draw seed, seed+1, ...)."""
    refused = refused_fields(req)
    if refused:
        raise RequestError(refused, f"{refused} is not supported by this server")
    if not 1 <= req.n <= MAX_N:
        raise RequestError("n", f"n={req.n}: must be in [1, {MAX_N}]")
    if isinstance(req, CompletionRequest) and req.best_of is not None and req.best_of != req.n:
        raise RequestError("best_of", "best_of is not supported (only best_of == n)")
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options", "stream_options needs stream=true")
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise RequestError("stream_options.continuous_usage_stats", "continuous_usage_stats is not supported")
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    logprobs = _logprobs_count(req)
    values = dict(max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                  temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p,
                  top_k=-1 if req.top_k is None else req.top_k,
                  min_p=0.0 if req.min_p is None else req.min_p,
                  seed=req.seed, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                  stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                  min_tokens=req.min_tokens,
                  presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                  repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                  logprobs=logprobs)
    try:
        first = SamplingParams(**values)
    except ParamError as exc:
        raise RequestError(_request_field(req, exc.field), str(exc)) from None
    if req.seed is None:
        return [first] + [SamplingParams(**values) for _ in range(req.n - 1)]
    return [first] + [SamplingParams(**{**values, "seed": (req.seed + i) % SEED_SPAN}) for i in range(1, req.n)]


def _logprobs_count(req: Request) -> Optional[int]:
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and req.echo:
            raise RequestError("echo", "echo with logprobs (prompt logprobs) is not supported")
        return req.logprobs
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs", "top_logprobs needs logprobs=true")
    if not req.logprobs:
        return None
    return 0 if req.top_logprobs is None else req.top_logprobs


def _request_field(req: Request, field: str) -> str:
    """SamplingParams' field name as the request spells it."""
    if field == "max_tokens" and isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    if field == "logprobs" and isinstance(req, ChatCompletionRequest):
        return "top_logprobs"
    return field


def completion_prompts(req: CompletionRequest) -> List[Union[str, List[int]]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt", "prompt must not be an empty list")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def check_model(requested: Optional[str], served: str) -> None:
    if requested is not None and requested != served:
        raise RequestError("model", f"the model {requested!r} does not exist; this server serves {served!r}",
                           status=404, kind="not_found_error", code="model_not_found")


# --- responses ----------------------------------------------------------------------------------
def _head(kind: str, model: str) -> Dict[str, Any]:
    prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


TokenText = Callable[[int], str]


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, offset: int) -> Dict[str, Any]:
    """The completions shape: parallel lists; `offset` is where these tokens' text starts."""
    tokens = [token_text(e.token_id) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> Dict[str, Any]:
    def item(token_id: int, logprob: float) -> Dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_choice(index: int, text: str, finish_reason: Optional[str],
                      logprobs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: Optional[str],
                logprobs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: Dict[str, Any], finish_reason: Optional[str],
               logprobs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def response_body(kind: str, model: str, choices: List[Dict[str, Any]], usage_: Dict[str, int]) -> Dict[str, Any]:
    return {**_head(kind, model), "choices": choices, "usage": usage_}


def chunk_head(chat: bool, model: str) -> Dict[str, Any]:
    return _head("chat.completion.chunk" if chat else "text_completion", model)

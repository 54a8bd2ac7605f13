"""What generate() returns, shaped like vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model, and the likeliest alternatives."""
    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)  # (token id, logprob), likeliest first


@dataclass
class CompletionOutput:
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | "error"
    logprobs: Optional[List[TokenLogprob]] = None  # one per token, when SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput] = field(default_factory=list)
    error: Optional[str] = None  # why this request failed; the others are unaffected
    refused: bool = False  # the error is the request's own (refused at admission), not the engine's
    num_preemptions: int = 0
    time_to_first_token: Optional[float] = None  # seconds from arrival
    latency: Optional[float] = None  # seconds from arrival to the last token

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> List[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason

"""What generate() returns, shaped like vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class CompletionOutput:
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]  # "stop" | "length" | "error"


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput] = field(default_factory=list)
    error: Optional[str] = None  # why this request failed; the others are unaffected
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

"""Per-request generation settings, shaped like vLLM's SamplingParams."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: Optional[int] = None  # a per-request generator: same seed, same tokens
    stop: List[str] = field(default_factory=list)  # stop strings, excluded from the text
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def problem(self) -> Optional[str]:
        """Why these settings cannot run, or None. Checked per request, never fatal to others."""
        if self.max_tokens <= 0:
            return f"max_tokens={self.max_tokens} must be > 0"
        if self.temperature < 0:
            return f"temperature={self.temperature} must be >= 0"
        if not 0 < self.top_p <= 1:
            return f"top_p={self.top_p} must be in (0, 1]"
        if self.top_k == 0 or self.top_k < -1:
            return f"top_k={self.top_k} must be -1 or positive"
        return None

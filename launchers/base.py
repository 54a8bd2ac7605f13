"""What every launcher offers the LLM object, the tasks and the server; nothing reaches past it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional

from framework.engine.outputs import RequestOutput


class Launcher(ABC):
    @abstractmethod
    def generate(self, prompts: List[Any], params: Any, progress: bool) -> List[RequestOutput]: ...

    @abstractmethod
    def score(self, windows: List[List[int]]) -> List[float]:
        """Summed negative log-likelihood of each token-id window after its first token."""

    @abstractmethod
    def stats(self) -> Dict[str, Any]:
        """{"ranks": [per-rank load time, KV cache, measured memory]} for metrics.json."""

    @abstractmethod
    def shutdown(self) -> None: ...

    def local_engine(self) -> Optional[Any]:
        """The LLMEngine when it runs in this process (bench's timings read it); None when rank
        0 lives elsewhere (a Ray actor)."""
        return None

    def serving_engine(self, tokenizer: Any) -> Any:
        """What the server's engine loop drives step by step: the LLMEngine itself, or at TP > 1
        a RemoteEngine (launchers/remote_engine.py) over rank 0's actor."""
        return self.local_engine()

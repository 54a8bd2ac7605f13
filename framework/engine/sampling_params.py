"""Per-request generation settings, shaped like vLLM's SamplingParams.

Every value is checked when the object is built: a bad one raises a ValueError naming its field,
so nothing a request carries can reach a step and fail there (a seed over 2**64 used to kill the
engine thread inside torch; a NaN temperature, a NaN row in the sampler).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

SEED_RANGE = (0, 2 ** 64 - 1)  # what a torch.Generator takes
GREEDY_BELOW = 1e-5  # a temperature this small is greedy, as in vLLM: dividing by it overflows
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


class ParamError(ValueError):
    """A bad SamplingParams value; `field` names it (the server's 400 names it too)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(message)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest; 0 = off
    seed: Optional[int] = None  # a per-request generator: same seed, same tokens
    stop: List[str] = field(default_factory=list)  # stop strings, excluded from the text
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop tokens and stop strings are not honoured before this many tokens
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL's (vLLM's): tokens of prompt or output, logit / p if > 0 else x p
    logprobs: Optional[int] = None  # None: none; k: the sampled token's log-probability and the top k

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _integer("max_tokens", self.max_tokens, low=1)
        _number("temperature", self.temperature, low=0.0)
        _number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _integer("top_k", self.top_k, low=-1)
        if self.top_k == 0:
            raise ParamError("top_k", "top_k=0: must be -1 (off) or a positive integer")
        _number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _integer("seed", self.seed, low=SEED_RANGE[0], high=SEED_RANGE[1])
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", f"stop={self.stop!r}: must be a string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", f"stop_token_ids={self.stop_token_ids!r}: must be a list of token ids (integers >= 0)")
        if not isinstance(self.ignore_eos, bool):
            raise ParamError("ignore_eos", f"ignore_eos={self.ignore_eos!r}: must be true or false")
        _integer("min_tokens", self.min_tokens, low=0, high=self.max_tokens)
        _number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _number("repetition_penalty", self.repetition_penalty, low=0.0, high=None, low_open=True)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)

    def problem(self) -> Optional[str]:
        """Why these settings cannot run (fields changed after construction), or None."""
        try:
            self.validate()
        except ValueError as exc:
            return str(exc)
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits is the whole answer: no penalty, no min_tokens mask, no logprobs
        (such steps may sample on the device, ahead of the host; see LLMEngine._launch)."""
        return self.greedy and not self.has_penalties and self.min_tokens == 0 and self.logprobs is None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> None:
    if not _is_int(value):
        raise ParamError(name, f"{name}={value!r}: must be an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ParamError(name, f"{name}={value}: must be in [{low}, {'inf' if high is None else high}]")


def _number(name: str, value: Any, low: float, high: Optional[float] = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(name, f"{name}={value!r}: must be a finite number")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bracket = "(" if low_open else "["
        raise ParamError(name, f"{name}={value}: must be in {bracket}{low}, {'inf)' if high is None else f'{high}]'}")

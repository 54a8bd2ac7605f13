"""`multimodal.limit_mm_per_prompt`: how many items of each modality one prompt may carry.

Two forms, as vLLM takes them: `{image: 3, video: 1}`, or per modality a dict whose `count` is
the limit and whose sizes (`width`, `height`, `num_frames`) only bound what the planner profiles
the encoder for: `{image: {count: 3, width: 1024, height: 1024}}`. 0 switches a modality off;
every modality at 0, or `multimodal.language_model_only: true`, runs the decoder alone.

A modality the config does not name may carry DEFAULT_COUNT items (the planner budgets the
encoder for the same number).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional

from framework.config.errors import ConfigError

MODALITIES = ("image", "video", "audio")
SIZE_KEYS = ("width", "height", "num_frames")
DEFAULT_COUNT = 1
KEY = "multimodal.limit_mm_per_prompt"


class MultimodalInputError(ValueError):
    """A request's multimodal input cannot run (over a limit, undecodable, wrong type...): one line,
    this request fails alone."""


@dataclass(frozen=True)
class ModalityLimit:
    count: int
    width: Optional[int] = None  # the largest item's size to profile for; None = the processor's cap
    height: Optional[int] = None
    num_frames: Optional[int] = None  # videos
    default: bool = False  # the config does not name this modality


def _non_negative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "must be an integer >= 0 (0 disables the modality)")
    return value


def parse_limit(modality: str, raw: Any) -> ModalityLimit:
    key = f"{KEY}.{modality}"
    if modality not in MODALITIES:
        raise ConfigError(key, raw, f"unknown modality; valid modalities: {', '.join(MODALITIES)}")
    if not isinstance(raw, Mapping):
        return ModalityLimit(_non_negative_int(key, raw))
    unknown = [k for k in raw if k not in ("count",) + SIZE_KEYS]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", raw[unknown[0]],
                          f"unknown key; valid keys: count, {', '.join(SIZE_KEYS)}")
    if "count" not in raw:
        raise ConfigError(f"{key}.count", None, "is required in the dict form ({count: 3, width: 1024, height: 1024})")
    sizes = {}
    for size_key in SIZE_KEYS:
        value = raw.get(size_key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{key}.{size_key}", value, "must be a positive integer or null")
        sizes[size_key] = value
    return ModalityLimit(_non_negative_int(f"{key}.count", raw["count"]), **sizes)


def parse_limits(raw: Mapping[str, Any], language_model_only: bool = False,
                 modalities: Iterable[str] = MODALITIES) -> Dict[str, ModalityLimit]:
    """The limit of every modality in `modalities` (those the model takes), validated."""
    named = {m: parse_limit(m, value) for m, value in (raw or {}).items()}
    if language_model_only:
        return {m: ModalityLimit(0) for m in modalities}
    return {m: named.get(m, ModalityLimit(DEFAULT_COUNT, default=True)) for m in modalities}


def text_only(limits: Mapping[str, ModalityLimit]) -> bool:
    """True when no modality may carry an item: the vision tower is never built."""
    return all(limit.count == 0 for limit in limits.values())


def check_counts(counts: Mapping[str, int], limits: Mapping[str, ModalityLimit], language_model_only: bool = False) -> None:
    """Raises MultimodalInputError naming the limit a request's items exceed."""
    for modality, n in counts.items():
        if not n:
            continue
        if modality not in limits:
            raise MultimodalInputError(f"this model takes no {modality} input; it takes: "
                                       f"{', '.join(limits) or 'text only'}")
        if language_model_only:
            raise MultimodalInputError(f"the request has {n} {modality} item(s); multimodal.language_model_only=true "
                                       "runs the decoder alone")
        limit = limits[modality]
        if n > limit.count:
            raise MultimodalInputError(f"the request has {n} {modality} item(s); {KEY}.{modality}={limit.count}"
                                       + (" (the default; raise it in the config)" if limit.default else ""))

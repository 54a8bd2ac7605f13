"""A request's state as it moves through the scheduler: tokens, KV blocks, progress."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, List, Optional, Tuple

import torch

from framework.engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


@dataclass
class Sequence:
    token_ids: List[int]
    params: SamplingParams
    request_id: str = ""
    prompt: Optional[str] = None  # the text, when the request came as text
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = 0
    # Tokens whose K/V are in the cache. Preemption resets it to 0 (recompute); prefix-cache hits raise it.
    num_computed_tokens: int = 0
    block_table: List[int] = field(default_factory=list)
    # Sliding-window layers' own blocks, by logical block; -1 where the window has passed (block_manager.py)
    window_block_table: List[int] = field(default_factory=list)
    block_hashes: List[int] = field(default_factory=list)  # prefix caching: chained hash per full block
    num_registered_blocks: int = 0  # full blocks already published to the prefix cache
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None
    text: Optional[str] = None  # set when a stop string cut the output (maybe to "")
    generator: Optional[torch.Generator] = None  # seeded requests only
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    # Multimodal prompts: each image/video with its placeholder run (multimodal/processor.PlacedItem),
    # and under M-RoPE the prompt's [3, P] positions; a later token p sits at p + mrope_delta.
    mm_items: List[Any] = field(default_factory=list)
    mrope_positions: Optional[torch.Tensor] = None
    mrope_delta: int = 0
    # [start, end) of each run of prompt tokens that attend to each other both ways (Gemma-3's
    # images): a prefill chunk never ends inside one (scheduler.py), and its tokens' causal limit
    # is the run's last position (step_input.py)
    bidirectional_runs: List[Tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def block_extra(self, start: int, end: int) -> tuple:
        """Content hashes of the items whose placeholders fall in tokens [start, end): a KV block's
        prefix-cache hash mixes them in, so two different images never share KV."""
        return tuple((p.item.content_hash, max(start, p.offset) - p.offset)
                     for p in self.mm_items if p.offset < end and p.end > start)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

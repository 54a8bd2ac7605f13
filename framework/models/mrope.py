"""M-RoPE positions (Qwen2-VL, Qwen2.5-VL): three position rows per token, time, height, width.

Text tokens advance all three rows together, one step a token. An image or video's placeholder
tokens (one per merged patch block) all start at the position where the item begins: the time
row counts temporal patches (videos: scaled to `tokens_per_second` ticks of the clip's real
time), the height and width rows count block rows and columns. The text after an item resumes
at start + max(blocks high, blocks wide), as transformers 5 computes it (its `get_rope_index`).

Decoding continues from the prompt: token i >= len(prompt) sits at i + delta on all three
rows, delta = max prompt position + 1 - len(prompt) (<= 0 when items fold many tokens into a few
positions). A sequence keeps its [3, T] prompt positions and its delta; chunked prefill slices
the positions, and a decode step needs only the delta.

Where transformers versions disagree (videos only): 5.17 truncates a video's seconds per
temporal patch to an integer before scaling, 4.x (and vLLM) resume the text after a video at
its largest position + 1, which differs from the rule above when the time row outgrows the
height and width rows. The default 2-fps frame sampling gives 1.0 s per patch, where 5.17 and
5.24 agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch


@dataclass(frozen=True)
class MropeItem:
    offset: int  # index of the item's first placeholder token in the prompt
    grid_thw: Tuple[int, int, int]  # the processor's grid: temporal patches, patch rows, patch columns
    is_video: bool = False
    second_per_grid: float = 1.0  # videos: seconds of the clip one temporal patch spans

    def num_tokens(self, spatial_merge_size: int) -> int:
        t, h, w = self.grid_thw
        return t * (h // spatial_merge_size) * (w // spatial_merge_size)


def mrope_positions(num_tokens: int, items: Sequence[MropeItem], spatial_merge_size: int,
                    tokens_per_second: float) -> Tuple[torch.Tensor, int]:
    """([3, num_tokens] long positions of a prompt, delta for the tokens after it)."""
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    cursor = 0  # next token index
    next_pos = 0  # position of the next text token
    for item in sorted(items, key=lambda i: i.offset):
        if item.offset < cursor:
            raise ValueError(f"multimodal item at token {item.offset} overlaps the previous item, which ends at "
                             f"token {cursor}")
        text = item.offset - cursor
        positions[:, cursor:item.offset] = torch.arange(next_pos, next_pos + text)
        next_pos += text
        t, h, w = item.grid_thw[0], item.grid_thw[1] // spatial_merge_size, item.grid_thw[2] // spatial_merge_size
        end = item.offset + t * h * w
        if end > num_tokens:
            raise ValueError(f"multimodal item at token {item.offset} needs {t * h * w} placeholder tokens; "
                             f"the prompt has {num_tokens} tokens in all")
        if item.is_video:  # float32 product, as transformers computes it from the processor's tensor
            interval = torch.tensor(item.second_per_grid, dtype=torch.float32) * tokens_per_second
            times = (torch.arange(t) * interval).long()
        else:
            times = torch.arange(t)
        grid = torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")
        positions[:, item.offset:end] = torch.stack(grid).view(3, -1) + next_pos
        next_pos += max(h, w)
        cursor = end
    positions[:, cursor:] = torch.arange(next_pos, next_pos + num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


def decode_positions(first_token: int, count: int, delta: int) -> torch.Tensor:
    """[3, count] positions of tokens first_token .. first_token+count-1 past the prompt."""
    return (torch.arange(first_token, first_token + count) + delta).expand(3, count)

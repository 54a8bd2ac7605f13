"""Prompts and sampling settings from the task config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from framework.config.errors import UserError
from framework.config.schema import TaskConfig
from framework.engine.sampling_params import SamplingParams


def load_prompts(task: TaskConfig) -> List[str]:
    if not task.prompts_file:
        if not task.prompts:
            raise UserError("task.prompts is empty and task.prompts_file is not set: nothing to generate")
        return list(task.prompts)
    path = Path(task.prompts_file).expanduser()
    if not path.is_file():
        raise UserError(f"task.prompts_file={task.prompts_file!r}: no such file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"task.prompts_file={task.prompts_file!r}: each line must be JSON with a "
                            f"'prompt' field ({exc})") from exc
    return lines


def load_images(task: TaskConfig, count: int) -> List[List[str]]:
    """The images of each of `count` prompts: a JSONL prompts_file's "images" field (a list of paths
    or URLs) per line, else task.images for every prompt."""
    path = Path(task.prompts_file).expanduser() if task.prompts_file else None
    if path is not None and path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        images = [row.get("images") or [] for row in rows]
        bad = [i for i, row in enumerate(images) if not isinstance(row, list)]
        if bad:
            raise UserError(f"task.prompts_file={task.prompts_file!r}: line {bad[0] + 1}: \"images\" must be a "
                            "list of paths or URLs")
        return images
    return [list(task.images)] * count


def sampling_params(task: TaskConfig) -> SamplingParams:
    return SamplingParams(max_tokens=task.max_tokens, temperature=task.temperature, top_p=task.top_p,
                          top_k=task.top_k, seed=task.seed, ignore_eos=task.ignore_eos)

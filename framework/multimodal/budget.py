"""The encoder cache budget in embedding tokens, the same on every rank: vLLM's rule,
`max_num_batched_tokens` raised to the largest item the processor settings allow.

The largest item follows the planner's count (memory/encoder.item_tokens) under the pixel cap in
force: `multimodal.mm_processor_kwargs.max_pixels`, else the model folder's own processor config
(read as JSON: every rank computes this before any processor is loaded), else the HF default.
InternVL's tiles likewise: `max_dynamic_patch` / `max_patches`, else the folder's `max_patches`;
Gemma-3's pan-and-scan crops: `do_pan_and_scan` / `pan_and_scan_max_num_crops`, else the folder's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from framework.config.schema import FrameworkConfig


def folder_max_tiles(folder: Path) -> Optional[int]:
    """The most tiles an image is cut into (InternVL's GotOcr2 processor: max_patches), if stated."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            value = data.get("image_processor", data).get("max_patches")
            if value:
                return int(value)
    return None


def folder_max_pixels(folder: Path) -> Optional[int]:
    """The image pixel cap a model folder's processor config states, if any."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        data = data.get("image_processor", data)
        if data.get("max_pixels"):
            return int(data["max_pixels"])
        size = data.get("size") or {}
        if size.get("longest_edge"):
            return int(size["longest_edge"])
    return None


def folder_pan_and_scan(folder: Path) -> dict:
    """Gemma-3's pan-and-scan settings a model folder's processor config states (do_pan_and_scan,
    pan_and_scan_max_num_crops), if any."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            return {k: data[k] for k in ("do_pan_and_scan", "pan_and_scan_max_num_crops") if data.get(k) is not None}
    return {}


def encoder_budget_tokens(cfg: FrameworkConfig, folder: Path, hf_config: Any, modalities) -> int:
    from framework.memory.encoder import item_tokens
    from framework.memory.shape import vision_shape
    from framework.multimodal.limits import parse_limits
    kwargs = dict(cfg.multimodal.mm_processor_kwargs)
    processor_folder = Path(cfg.model.tokenizer).expanduser() if cfg.model.tokenizer else folder
    if "max_pixels" not in kwargs:
        cap = folder_max_pixels(processor_folder)
        if cap:
            kwargs["max_pixels"] = cap
    if "max_dynamic_patch" not in kwargs and "max_patches" not in kwargs:
        tiles = folder_max_tiles(processor_folder)
        if tiles:
            kwargs["max_patches"] = tiles
    for key, value in folder_pan_and_scan(processor_folder).items():
        kwargs.setdefault(key, value)
    v = vision_shape(hf_config)
    limits = parse_limits(cfg.multimodal.limit_mm_per_prompt, cfg.multimodal.language_model_only, modalities)
    largest = max([item_tokens(v, m, kwargs, cfg.cache.max_model_len, limits[m])
                   for m in modalities if limits[m].count > 0] or [0])
    return max(cfg.cache.max_num_batched_tokens, largest)

"""The multimodal encoder's memory on each rank: its weights, one batch of its activations and
the cache of its outputs. Zero for a text model, or when every modality's limit is 0.

It follows vLLM's budget, the one users of these knobs know, which the engine's encoder cache
uses too (framework/multimodal/budget.py): the encoder runs on at most `max(max_num_batched_tokens, the largest item)` LLM
tokens at once, and its output cache holds as many. An item's tokens come from the
processor's pixel cap (`multimodal.mm_processor_kwargs.max_pixels`, else the HF processor's
default) and can never exceed max_model_len. The encoder is replicated on every rank (no TP
slicing) and is assumed to use memory-efficient attention (no patches^2 scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from framework.memory.shape import VisionShape
from framework.multimodal.limits import ModalityLimit, parse_limits

IMAGE_MAX_PIXELS = 28 * 28 * 1280  # transformers Qwen2VLImageProcessor's default cap
VIDEO_MAX_PIXELS = 28 * 28 * 768  # ... and Qwen2VLVideoProcessor's, per frame
VIDEO_MAX_FRAMES = 768  # Qwen2VLVideoProcessor.max_frames
INTERNVL_MAX_TILES = 12  # GotOcr2ImageProcessor.max_patches, and InternVL2's max_dynamic_patch
FUYU_CANVAS = {"height": 1080, "width": 1920}  # FuyuImageProcessor's default size (images are padded to it)
GEMMA3_MAX_CROPS = 4  # Gemma3Processor's pan_and_scan_max_num_crops
# Gemma-3's pan-and-scan item runs from the original image's tokens to the last crop's, with the
# text the processor writes between them (" and here are some crops to help you see better ",
# and <end_of_image>, newlines, <start_of_image> around each crop): about 15 tokens, then 5 a crop,
# with Gemma's tokenizer; these bounds leave room
GEMMA3_CROP_TEXT_FIRST, GEMMA3_CROP_TEXT_EACH = 24, 8


@dataclass(frozen=True)
class EncoderBudget:
    weight_bytes: int
    activation_bytes: int
    output_cache_bytes: int
    tokens: int  # LLM tokens the encoder processes (and caches) at once
    item_tokens: Dict[str, int]  # the largest item of each enabled modality

    @property
    def total(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.output_cache_bytes


def vision_weight_elems(v: VisionShape) -> int:
    """Parameters of the vision encoder. Exact for Qwen2.5-VL (RMSNorm, gated MLP with biases,
    a 2-layer merger over merge_size^2 patches); other encoders get the same layout with
    LayerNorm and a 2-matrix MLP: an estimate within a few percent for ViT-style towers."""
    h, i = v.hidden_size, v.intermediate_size
    if v.model_type == "fuyu":  # vision_embed_tokens alone
        return v.in_channels * v.patch_size ** 2 * h + h
    if v.tokens_per_image:  # Gemma-3 (exact): SigLIP (patch conv with bias, positions, LayerNorm blocks,
        # post-LayerNorm), then the projector's RMSNorm and its bias-free projection
        block = 4 * h + 4 * h * h + 4 * h + (h * i + i) + (i * h + h)
        patch = v.in_channels * v.patch_size ** 2 * h + h
        return patch + (v.image_size // v.patch_size) ** 2 * h + v.depth * block + 2 * h + h + h * v.out_hidden_size
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * h
    attn = 3 * h * h + 3 * h + h * h + h
    merged = round(h * v.merge_size ** 2 / v.downsample_ratio ** 2)  # the projector's input width
    if v.model_type.startswith("qwen2_5_vl"):
        block = 2 * h + attn + 2 * (h * i + i) + (i * h + h)
        merger = h + merged * merged + merged + v.out_hidden_size * merged + v.out_hidden_size
        return patch + v.depth * block + merger
    block = 4 * h + attn + (h * i + i) + (i * h + h)
    positions = (v.image_size // v.patch_size) ** 2 * h if v.image_size else 0
    projector = merged * v.out_hidden_size + v.out_hidden_size
    if v.downsample_ratio < 1:  # InternVL (exact): the projector's LayerNorm and second Linear; the class
        # token, its position and the patch convolution's bias; two per-channel branch scales a block
        projector += 2 * merged + v.out_hidden_size ** 2 + v.out_hidden_size + 3 * h + v.depth * 2 * h
    return patch + positions + v.depth * block + projector


def item_tokens(v: VisionShape, modality: str, kwargs: Mapping[str, Any], max_model_len: int,
                limit: Optional[ModalityLimit] = None) -> int:
    """LLM tokens of the largest item of one modality; `limit`'s width x height (and num_frames)
    in limit_mm_per_prompt's dict form bound the item profiled, as in vLLM."""
    if v.model_type == "fuyu":  # rows of patches over the padded canvas, a newline a row, then <s>
        size = kwargs.get("size") or FUYU_CANVAS
        rows, cols = -(-int(size["height"]) // v.patch_size), -(-int(size["width"]) // v.patch_size)
        if limit is not None and limit.width and limit.height:
            rows, cols = min(rows, -(-limit.height // v.patch_size)), min(cols, -(-limit.width // v.patch_size))
        return max(1, min(rows * (cols + 1) + 1, max_model_len))
    if v.tokens_per_image:  # Gemma-3: a fixed count an image, and as many a pan-and-scan crop
        crops = int(kwargs.get("pan_and_scan_max_num_crops", GEMMA3_MAX_CROPS)) if kwargs.get("do_pan_and_scan") else 0
        tokens = v.tokens_per_image * (1 + crops)
        if crops:
            tokens += GEMMA3_CROP_TEXT_FIRST + GEMMA3_CROP_TEXT_EACH * (crops - 1)
        return max(1, min(tokens, max_model_len))
    if v.merge_size > 1:  # Qwen2-VL family: dynamic resolution, merge_size^2 patches per token
        side = v.patch_size * v.merge_size
        cap = int(kwargs.get("max_pixels", IMAGE_MAX_PIXELS if modality == "image" else VIDEO_MAX_PIXELS)) // side ** 2
        if limit is not None and limit.width and limit.height:  # its tokens, rounded up to whole blocks
            cap = min(cap, -(-limit.width // side) * -(-limit.height // side))
        if modality == "image":
            tokens = cap
        else:
            frames = int(limit.num_frames if limit is not None and limit.num_frames else
                         kwargs.get("max_frames", VIDEO_MAX_FRAMES))
            tokens = cap * -(-frames // v.temporal_patch_size)
    else:  # fixed resolution: one tile of (image_size / patch)^2 patches, or several (InternVL)
        side = (v.image_size or 336) // v.patch_size
        default_tiles = INTERNVL_MAX_TILES if v.downsample_ratio < 1 else 1
        tiles = int(kwargs.get("max_dynamic_patch", kwargs.get("max_patches", default_tiles)))
        per_tile = round(side * side * v.downsample_ratio ** 2)  # after InternVL's pixel shuffle
        tokens = per_tile * (tiles + (1 if tiles > 1 else 0))  # + the thumbnail tile
    return max(1, min(tokens, max_model_len))


def encoder_budget(v: VisionShape, limit_mm_per_prompt: Mapping[str, int], kwargs: Mapping[str, Any],
                   max_num_batched_tokens: int, max_model_len: int, dtype_bytes: int) -> EncoderBudget:
    modalities = ("image", "video") if v.temporal_patch_size > 1 else ("image",)
    enabled = {m: limit for m, limit in parse_limits(limit_mm_per_prompt, modalities=modalities).items()
               if limit.count > 0}
    if not enabled:
        return EncoderBudget(0, 0, 0, 0, {})
    items = {m: item_tokens(v, m, kwargs, max_model_len, limit) for m, limit in enabled.items()}
    tokens = max(max_num_batched_tokens, max(items.values()))
    patches = round(tokens * v.merge_size ** 2 / v.downsample_ratio ** 2)
    if v.tokens_per_image:  # Gemma-3 pools each image's patch grid to tokens_per_image
        patches = tokens * (v.image_size // v.patch_size) ** 2 // v.tokens_per_image
    h, i = v.hidden_size, v.intermediate_size
    # one block: hidden + residual + normed (3h), then the worse of attention (qkv, rotated q/k,
    # output, projection: 7h) and the gated MLP (gate, up, their product: 3i)
    per_patch = 3 * h + max(7 * h, 3 * i)
    if v.model_type == "fuyu":  # the patch values and their projection
        per_patch = v.in_channels * v.patch_size ** 2 + h
    activation = patches * per_patch * dtype_bytes
    return EncoderBudget(
        weight_bytes=vision_weight_elems(v) * dtype_bytes,
        activation_bytes=activation,
        output_cache_bytes=tokens * v.out_hidden_size * dtype_bytes,
        tokens=tokens, item_tokens=items)

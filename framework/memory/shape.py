"""The sizes the planner needs, read from config.json alone: the decoder and, for a
vision-language model, the vision encoder.

The decoder's widths come from the model itself (`decoder_shape()` of a model built on the
`meta` device, models/interface.py), so the planner and the model cannot disagree on a head
count or a bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional



@dataclass(frozen=True)
class DecoderShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    logits_scaling: float  # != 1 costs one more logits-sized tensor (Granite)
    embedding_multiplier: float  # != 1 costs one more hidden-sized tensor (Granite)


@dataclass(frozen=True)
class VisionShape:
    model_type: str
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    in_channels: int
    temporal_patch_size: int  # frames per patch (Qwen2-VL family); 1 for image-only encoders
    merge_size: int  # patches merged into one LLM token per side (Qwen2-VL: spatial_merge_size)
    out_hidden_size: int  # width of what the encoder hands the decoder
    image_size: Optional[int]  # fixed-resolution encoders (CLIP, SigLIP, InternViT)
    downsample_ratio: float = 1.0  # InternVL's pixel shuffle: a tile's tokens are patches x ratio^2
    tokens_per_image: Optional[int] = None  # Gemma-3: the patch grid average-pooled to mm_tokens_per_image


def architecture(hf_config: Any) -> str:
    return (getattr(hf_config, "architectures", None) or ["?"])[0]


def text_config(hf_config: Any) -> Any:
    return getattr(hf_config, "text_config", None) or hf_config


def _first(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def vision_shape(hf_config: Any) -> Optional[VisionShape]:
    v = getattr(hf_config, "vision_config", None)
    if v is None and getattr(hf_config, "model_type", None) == "fuyu":  # no tower: patches -> one linear
        hidden = int(text_config(hf_config).hidden_size)
        return VisionShape(model_type="fuyu", depth=0, hidden_size=hidden, intermediate_size=0, num_heads=0,
                           patch_size=_side(hf_config.patch_size), in_channels=int(hf_config.num_channels),
                           temporal_patch_size=1, merge_size=1, out_hidden_size=hidden, image_size=None)
    if v is None:
        return None
    # Qwen2-VL names its width embed_dim and uses hidden_size for the decoder's width
    hidden = int(_first(v, "embed_dim", "hidden_size"))
    out_hidden = _first(v, "out_hidden_size", default=v.hidden_size if getattr(v, "embed_dim", None) else None)
    return VisionShape(
        model_type=str(getattr(v, "model_type", "") or ""),
        depth=int(_first(v, "depth", "num_hidden_layers")),
        hidden_size=hidden,
        intermediate_size=int(_first(v, "intermediate_size", default=_first(v, "mlp_ratio", default=4) * hidden)),
        num_heads=int(_first(v, "num_heads", "num_attention_heads")),
        patch_size=_side(_first(v, "patch_size", "spatial_patch_size", default=14)),
        in_channels=int(_first(v, "in_channels", "in_chans", "num_channels", default=3)),
        temporal_patch_size=int(_first(v, "temporal_patch_size", default=1)),
        merge_size=int(_first(v, "spatial_merge_size", default=1)),
        out_hidden_size=int(out_hidden or text_config(hf_config).hidden_size),
        image_size=_side(v.image_size) if getattr(v, "image_size", None) else None,
        downsample_ratio=float(getattr(hf_config, "downsample_ratio", None) or 1.0),
        tokens_per_image=getattr(hf_config, "mm_tokens_per_image", None))


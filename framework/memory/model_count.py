"""What a model holds on one rank, counted from the model itself built on the `meta` device.

The planner never re-describes an architecture: it builds the registered model class with the
rank's ModelContext (TP rank and size, the quantization resolver, dtype) on `meta`, where
tensors have shapes and dtypes but no memory, and counts what the engine would allocate:
weights (as measure.weight_bytes counts a loaded model), the rotary tables, and the KV cache's
bytes per token from each layer's attention spec. Builds are cached; a build is a fraction of a
second even for an 8B model.

The rotary tables scale with max_model_len, which the planner's `auto` search varies, so the
model is built at max_model_len=1 and the tables' one row scaled up.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from framework.config.schema import MultimodalConfig, QuantizationConfig
from framework.layers.attention import AttentionSpec
from framework.layers.embedding import VocabParallelEmbedding
from framework.layers.linear import LinearBase
from framework.layers.quantization import QuantResolver
from framework.layers.rotary import RotaryEmbedding
from framework.memory.measure import weight_bytes
from framework.memory.shape import DecoderShape
from framework.models.context import ModelContext
from framework.models.interface import attention_specs, build_model
from framework.parallel import ParallelInfo


@dataclass(frozen=True)
class ModelCount:
    """One rank's model, as the planner needs it."""

    weight_bytes: int  # parameters + persistent buffers, each tensor once
    linear_bytes: int  # of which: the linear layers' weights (quantized storage and scales)
    embedding_bytes: int  # of which: embedding and lm_head (once if tied)
    rotary_bytes_per_position: int  # float32 cos and sin rows, non-persistent
    attention: Tuple[AttentionSpec, ...]  # one per layer that keeps KV
    decoder: DecoderShape  # the widths the activation estimate follows
    vision_bytes: int  # of weight_bytes: the vision tower and projector (0 for text-only)

    def kv_bytes_per_token(self, kv_dtype_bytes: int) -> int:
        return sum(2 * a.num_kv_heads * a.head_dim * kv_dtype_bytes for a in self.attention)

    def kv_bytes_for_context(self, kv_dtype_bytes: int, context: int, block_size: int) -> int:
        """KV bytes one sequence of `context` tokens needs when each window layer keeps only the
        blocks its window can still reach (at most ceil(W / block_size) + 1 of them) and each
        full layer keeps every block: the layout issue 13 asks for, against which
        kv_bytes_per_token() * context is the all-full layout."""
        blocks = -(-context // block_size)
        total = 0
        for a in self.attention:
            kept = blocks if not a.sliding_window else min(blocks, -(-a.sliding_window // block_size) + 1)
            total += 2 * a.num_kv_heads * a.head_dim * kv_dtype_bytes * kept * block_size
        return total

    def kv_bytes_by_kind(self, kv_dtype_bytes: int) -> Dict[str, int]:
        """Bytes per token of context of full-attention layers and of sliding-window layers."""
        out = {"full": 0, "sliding": 0}
        for a in self.attention:
            out["sliding" if a.sliding_window else "full"] += 2 * a.num_kv_heads * a.head_dim * kv_dtype_bytes
        return out


def _own_bytes(module: nn.Module, skip_bias: bool = False) -> int:
    tensors = [t for name, t in module.state_dict(keep_vars=True).items()
               if "." not in name and not (skip_bias and name == "bias")]
    return sum(t.numel() * t.element_size() for t in tensors)


def count_built(model: nn.Module) -> ModelCount:
    linears = sum(_own_bytes(m, skip_bias=True) for m in model.modules() if isinstance(m, LinearBase))
    embeddings = {id(m.weight): m.weight for m in model.modules() if isinstance(m, VocabParallelEmbedding)}
    rotary = {id(b): b for m in model.modules() if isinstance(m, RotaryEmbedding) for b in m.buffers()}
    vision = getattr(model, "vision_modules", lambda: [])()
    return ModelCount(
        weight_bytes=weight_bytes(model),
        linear_bytes=linears,
        embedding_bytes=sum(t.numel() * t.element_size() for t in embeddings.values()),
        rotary_bytes_per_position=sum(b.element_size() * b[0].numel() for b in rotary.values() if b.dim() == 2),
        attention=tuple(attention_specs(model)),
        decoder=model.decoder_shape(),
        vision_bytes=sum(weight_bytes(m) for m in vision))


@lru_cache(maxsize=64)
def _count(hf_key: int, dtype: torch.dtype, tp: ParallelInfo, quant_key: Tuple, multimodal_key: Tuple,
           cuda: bool) -> ModelCount:
    hf_config = _CONFIGS[hf_key]
    quant = QuantResolver.build(QuantizationConfig(*quant_key), hf_config, tp.size, cuda)
    limits, language_model_only = multimodal_key
    multimodal = MultimodalConfig(limit_mm_per_prompt={k: dict(v) if isinstance(v, tuple) else v for k, v in limits},
                                  language_model_only=language_model_only)
    ctx = ModelContext(hf_config, dtype, max_model_len=1, tp=tp, quant=quant, multimodal=multimodal)
    return count_built(build_model(ctx, "meta"))


_CONFIGS: Dict[int, Any] = {}  # id -> config object, kept alive so an id is never reused


def count_model(hf_config: Any, dtype: torch.dtype, tp_size: int, quantization: QuantizationConfig,
                multimodal: Optional[MultimodalConfig] = None, cuda: bool = False) -> List[ModelCount]:
    """Each rank's count (quantization resolved: no `auto`); `cuda`: the ranks are GPUs (int4
    keeps a second, tinygemm copy there)."""
    _CONFIGS.setdefault(id(hf_config), hf_config)
    multimodal = multimodal or MultimodalConfig()
    key = (tuple(sorted((k, _hashable(v)) for k, v in multimodal.limit_mm_per_prompt.items())),
           bool(multimodal.language_model_only))
    quant_key = astuple(quantization)  # the config's fields, hashable (the cache key)
    return [_count(id(hf_config), dtype, ParallelInfo(r, tp_size), quant_key, key, cuda) for r in range(tp_size)]


def _hashable(value: Any) -> Any:
    return tuple(sorted(value.items())) if isinstance(value, dict) else value

"""Weight bytes of one tensor-parallel rank, from the shapes alone.

Every count mirrors a layer of framework/layers: QKVParallelLinear (query heads split, KV heads
split or, with fewer KV heads than ranks, replicated), MergedColumnParallelLinear (gate/up),
RowParallelLinear (o/down: inputs split, bias whole), VocabParallelEmbedding and ParallelLMHead
(ceil(vocab / tp) rows each, the last rank zero-padded), RMSNorm (replicated). Quantization
(framework/layers/quantization) replaces only those four linear weights; biases, norms,
embeddings and lm_head stay in the model dtype.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from framework.memory.shape import DecoderShape, VisionShape

SCALE_BYTES_PER_CHANNEL = 4  # fp8/int8: one float32 scale per output row
QUANT_METHODS = ("none", "fp8", "int8", "int4")


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    return max(1, num_kv_heads // tp)


def decoder_linears(s: DecoderShape, tp: int) -> List[Tuple[str, int, int]]:
    """(name, out_features, in_features) of one layer's linear weights on one rank."""
    q_out = s.num_heads // tp * s.head_dim
    kv_out = kv_heads_per_rank(s.num_kv_heads, tp) * s.head_dim
    inter = s.intermediate_size // tp
    return [("qkv_proj", q_out + 2 * kv_out, s.hidden_size),
            ("o_proj", s.hidden_size, s.num_heads * s.head_dim // tp),
            ("gate_up_proj", 2 * inter, s.hidden_size),
            ("down_proj", s.hidden_size, inter)]


def linear_weight_bytes(out: int, inp: int, method: str, group_size: int, dtype_bytes: int) -> int:
    """One linear weight as its quantization method stores it."""
    if method == "none":
        return out * inp * dtype_bytes
    if method in ("fp8", "int8"):
        return out * inp + out * SCALE_BYTES_PER_CHANNEL
    if method == "int4":  # two codes a byte, one model-dtype scale per group of inputs
        return out * (inp // 2) + out * (inp // (group_size or inp)) * dtype_bytes
    raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(QUANT_METHODS)}")


def int4_group_fits(s: DecoderShape, tp: int, group_size: int) -> bool:
    """int4 needs even input features per rank that group_size divides (layers/quantization/int4)."""
    return all(inp % 2 == 0 and inp % group_size == 0 for _, _, inp in decoder_linears(s, tp))


def decoder_weight_bytes(s: DecoderShape, tp: int, dtype_bytes: int, method: str = "none",
                         group_size: int = 128) -> Dict[str, int]:
    """Bytes per rank by part: linear weights, biases + norms, embedding, lm_head."""
    lin = decoder_linears(s, tp)
    linears = sum(linear_weight_bytes(out, inp, method, group_size, dtype_bytes) for _, out, inp in lin)
    # column-parallel biases are split like their outputs; row-parallel ones are whole
    bias_elems = ((lin[0][1] if s.qkv_bias else 0) + (s.hidden_size if s.o_bias else 0)
                  + ((lin[2][1] + s.hidden_size) if s.mlp_bias else 0))
    norm_elems = 2 * s.hidden_size
    vocab_rows = -(-s.vocab_size // tp)
    embedding = vocab_rows * s.hidden_size * dtype_bytes
    return {
        "linear": s.num_layers * linears,
        "bias_norm": (s.num_layers * (bias_elems + norm_elems) + s.hidden_size) * dtype_bytes,
        "embedding": embedding,
        "lm_head": 0 if s.tie_word_embeddings else embedding,
    }


def rotary_table_bytes(s: DecoderShape, max_model_len: int) -> int:
    """layers/rotary.RotaryEmbedding: float32 cos and sin of [positions, head_dim/2], one table
    shared by all layers, one row per position below max_model_len (models/llama.py)."""
    positions = max_model_len
    return 2 * positions * (s.head_dim // 2) * 4


def vision_weight_elems(v: VisionShape) -> int:
    """Parameters of the vision encoder. Exact for Qwen2.5-VL (RMSNorm, gated MLP with biases,
    a 2-layer merger over merge_size^2 patches); other encoders get the same layout with
    LayerNorm and a 2-matrix MLP: an estimate within a few percent for ViT-style towers."""
    h, i = v.hidden_size, v.intermediate_size
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * h
    attn = 3 * h * h + 3 * h + h * h + h
    merged = h * v.merge_size ** 2
    if v.model_type.startswith("qwen2_5_vl"):
        block = 2 * h + attn + 2 * (h * i + i) + (i * h + h)
        merger = h + merged * merged + merged + v.out_hidden_size * merged + v.out_hidden_size
        return patch + v.depth * block + merger
    block = 4 * h + attn + (h * i + i) + (i * h + h)
    positions = (v.image_size // v.patch_size) ** 2 * h if v.image_size else 0
    projector = merged * v.out_hidden_size + v.out_hidden_size
    return patch + positions + v.depth * block + projector

"""Gemma-3's decoder: `Gemma3ForCausalLM`, and the decoder of `Gemma3ForConditionalGeneration`
(models/gemma3_vision.py adds its SigLIP tower and projector).

Where it differs from the Llama decoder (facts from HF's modeling_gemma3.py):
- RMSNorm scales by (1 + weight) (a checkpoint stores the offset from one), and there are four
  norms per layer: before and after attention, before and after the MLP;
- q and k are RMS-normalised per head before rotary; scores are scaled by
  query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype as HF does;
- the MLP is gelu_tanh(gate) * up;
- each layer is `sliding_attention` (a window of `sliding_window` keys, local rotary base) or
  `full_attention` (global rotary base with its scaling), as `layer_types` says;
- logits may be soft-capped (final_logit_softcapping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from framework.config.errors import UserError
from framework.layers.attention import Attention, AttentionMetadata
from framework.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from framework.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from framework.layers.norm import RMSNorm
from framework.layers.rotary import RopeTables, RotaryEmbedding
from framework.memory.shape import DecoderShape
from framework.models.context import ModelContext

SLIDING, FULL = "sliding_attention", "full_attention"


def _rope(params: Dict[str, Any], theta: float) -> Dict[str, Any]:
    out = dict(params or {})
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    out.setdefault("rope_theta", theta)
    return out


def gemma3_rope(c: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(local, global) rope settings. transformers 5 nests them per layer type in
    rope_parameters; older configs give rope_theta + rope_scaling (global) and
    rope_local_base_freq (local)."""
    nested = getattr(c, "rope_parameters", None) or {}
    if FULL in nested or SLIDING in nested:
        return _rope(nested.get(SLIDING), 10_000.0), _rope(nested.get(FULL), 1_000_000.0)
    local = {"rope_type": "default", "rope_theta": getattr(c, "rope_local_base_freq", None) or 10_000.0}
    return local, _rope(getattr(c, "rope_scaling", None), getattr(c, "rope_theta", None) or 1_000_000.0)


@dataclass
class Gemma3Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    layer_types: List[str]
    sliding_window: int
    rope_local: Dict[str, Any]
    rope_global: Dict[str, Any]
    query_pre_attn_scalar: float
    final_logit_softcapping: Optional[float]
    attention_bias: bool
    tie_word_embeddings: bool

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @classmethod
    def from_hf(cls, c: Any, tie_word_embeddings: bool) -> "Gemma3Args":
        # What we do not run is refused here, in one line, rather than run differently from HF.
        if getattr(c, "attn_logit_softcapping", None) is not None:
            raise UserError("Gemma-3: attn_logit_softcapping is not supported (Gemma-3 checkpoints leave it null)")
        if getattr(c, "use_bidirectional_attention", False):
            raise UserError("Gemma-3: use_bidirectional_attention=true (an encoder) is not supported")
        act = getattr(c, "hidden_activation", None) or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UserError(f"Gemma-3: hidden_activation {act!r} is not supported; supported: gelu_pytorch_tanh")
        layer_types = list(getattr(c, "layer_types", None) or [])
        if not layer_types:  # older configs: every `sliding_window_pattern`-th layer is global
            pattern = getattr(c, "sliding_window_pattern", None) or 6
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(c.num_hidden_layers)]
        unknown = sorted(set(layer_types) - {SLIDING, FULL})
        if unknown:
            raise UserError(f"Gemma-3: layer_types {unknown} are not supported; supported: {SLIDING}, {FULL}")
        local, glob = gemma3_rope(c)
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps, max_positions=c.max_position_embeddings,
            layer_types=layer_types[:c.num_hidden_layers], sliding_window=int(c.sliding_window),
            rope_local=local, rope_global=glob, query_pre_attn_scalar=float(c.query_pre_attn_scalar),
            final_logit_softcapping=getattr(c, "final_logit_softcapping", None),
            attention_bias=bool(getattr(c, "attention_bias", False)), tie_word_embeddings=tie_word_embeddings)


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight). The checkpoint's offset is kept as loaded and the one is
    added per call in float32: stored as 1 + w in bf16 it would lose the low bits HF keeps. As in
    HF's Gemma3RMSNorm the scale multiplies the float32 normalised value, rounded once at the end."""

    def __init__(self, hidden: int, eps: float):
        super().__init__(hidden, eps)
        nn.init.zeros_(self.weight)  # scale one, as HF initialises it

    def forward(self, x, residual=None):
        scale = self.weight.float() + 1.0
        if residual is None:
            return kernels.rms_norm(x, scale, self.eps, round_normed=False)
        return kernels.fused_add_rms_norm(x, residual, scale, self.eps, round_normed=False)


class Gemma3Attention(nn.Module):
    def __init__(self, a: Gemma3Args, ctx: ModelContext, prefix: str, sliding_window: Optional[int]):
        super().__init__()
        quant = ctx.quant.for_layer(f"{prefix}.qkv_proj", parts=("q_proj", "k_proj", "v_proj"))
        self.qkv_proj = QKVParallelLinear(a.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads,
                                          bias=a.attention_bias, quant=quant, tp=ctx.tp)
        self.o_proj = RowParallelLinear(a.num_heads * a.head_dim, a.hidden_size, bias=a.attention_bias,
                                        quant=ctx.quant.for_layer(f"{prefix}.o_proj"), tp=ctx.tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = a.head_dim
        self.q_norm = GemmaRMSNorm(a.head_dim, a.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(a.head_dim, a.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, a.head_dim, a.query_pre_attn_scalar ** -0.5,
                              sliding_window=sliding_window)

    def forward(self, rope: RopeTables, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        d = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q = self.q_norm(q.reshape(-1, d))  # per head, before rotary
        k = self.k_norm(k.reshape(-1, d))
        return self.o_proj(self.attn(rope, q, k, v, meta))


class Gemma3MLP(nn.Module):
    def __init__(self, a: Gemma3Args, ctx: ModelContext, prefix: str):
        super().__init__()
        quant = ctx.quant.for_layer(f"{prefix}.gate_up_proj", parts=("gate_proj", "up_proj"))
        self.gate_up_proj = MergedColumnParallelLinear(a.hidden_size, [a.intermediate_size] * 2, bias=False,
                                                       quant=quant, tp=ctx.tp)
        self.down_proj = RowParallelLinear(a.intermediate_size, a.hidden_size, bias=False,
                                           quant=ctx.quant.for_layer(f"{prefix}.down_proj"), tp=ctx.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, a: Gemma3Args, ctx: ModelContext, prefix: str, layer_type: str):
        super().__init__()
        self.is_sliding = layer_type == SLIDING
        self.self_attn = Gemma3Attention(a, ctx, f"{prefix}.self_attn", a.sliding_window if self.is_sliding else None)
        self.mlp = Gemma3MLP(a, ctx, f"{prefix}.mlp")
        eps = a.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(a.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(a.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(a.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(a.hidden_size, eps)

    def forward(self, rope: RopeTables, x: torch.Tensor, residual: Optional[torch.Tensor],
                meta: AttentionMetadata) -> Tuple[torch.Tensor, torch.Tensor]:
        # `residual` holds the running sum; the pre-norms add the previous block's output into it
        # (x is that output already post-normed), as HF's `residual + post_norm(block(...))` does.
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(rope, x, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(nn.Module):
    """The decoder and its (tied) head, built from ctx.text_config; `prefix` is where the
    checkpoint keeps the decoder (`model` here, `model.language_model` in the multimodal model)."""

    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, ctx: ModelContext, prefix: str = "model"):
        super().__init__()
        text, top = ctx.text_config, ctx.hf_config
        tied = getattr(text, "tie_word_embeddings", None)
        tied = bool(getattr(top, "tie_word_embeddings", True) if tied is None else tied)
        a = self.args = Gemma3Args.from_hf(text, tied)
        self.prefix, self.vocab_size = prefix, a.vocab_size
        max_positions = ctx.max_model_len or a.max_positions
        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size, ctx.tp)
        self.rotary_local = RotaryEmbedding(a.head_dim, max_positions, a.rope_local)
        self.rotary_global = RotaryEmbedding(a.head_dim, max_positions, a.rope_global)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(a, ctx, f"{prefix}.layers.{i}", kind)
                                    for i, kind in enumerate(a.layer_types))
        self.norm = GemmaRMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size, ctx.tp)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def checkpoint_name(self, name: str) -> str:
        return name if name.startswith("lm_head") else f"{self.prefix}.{name}"

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled text embeddings (HF rounds the scale to the weights' dtype first); a multimodal
        step merges unscaled encoder outputs into them."""
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.args.hidden_size ** 0.5, dtype=x.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        local, glob = self.rotary_local(positions), self.rotary_global(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(local if layer.is_sliding else glob, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)
        cap = self.args.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def decoder_shape(self) -> DecoderShape:
        a = self.args
        return DecoderShape(
            vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
            num_layers=a.num_layers, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
            max_positions=a.max_positions, tie_word_embeddings=a.tie_word_embeddings, qkv_bias=a.attention_bias,
            o_bias=a.attention_bias, mlp_bias=False,
            logits_scaling=2.0 if a.final_logit_softcapping else 1.0,  # one more logits-sized tensor
            embedding_multiplier=a.hidden_size ** 0.5)  # one more hidden-sized tensor

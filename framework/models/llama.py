"""The Llama family: Llama 3.x, Mistral, Qwen2 and Granite share this one decoder.

Their differences are a handful of numbers and flags read from config.json (`LlamaArgs`):
Qwen2 has biases on q/k/v, Granite scales embeddings, attention, residuals and logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from framework.layers.activation import SiluAndMul
from framework.layers.attention import Attention, AttentionMetadata
from framework.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from framework.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from framework.layers.norm import RMSNorm
from framework.layers.rotary import RopeTables, RotaryEmbedding, rope_parameters
from framework.memory.shape import DecoderShape
from framework.models.context import ModelContext


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    rope: Dict[str, Any]
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    embedding_multiplier: float = 1.0  # Granite
    attention_multiplier: Optional[float] = None  # Granite: replaces 1/sqrt(head_dim)
    residual_multiplier: float = 1.0  # Granite
    logits_scaling: float = 1.0  # Granite: logits are divided by it

    @classmethod
    def from_hf(cls, c: Any, architecture: str = "") -> "LlamaArgs":
        """`c`: the decoder's config; `architecture` of the whole model (a vision-language
        model's text_config names none, and Qwen2's q/k/v biases follow from the name)."""
        arch = architecture or (getattr(c, "architectures", None) or [""])[0]
        # a vision-language model's decoder (InternVL's) may be Qwen2 under another architecture name
        qwen2 = arch.startswith("Qwen2") or getattr(c, "model_type", None) == "qwen2"
        attention_bias = getattr(c, "attention_bias", False)
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps, max_positions=c.max_position_embeddings, rope=rope_parameters(c),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
            mlp_bias=getattr(c, "mlp_bias", False),
            embedding_multiplier=getattr(c, "embedding_multiplier", 1.0),
            attention_multiplier=getattr(c, "attention_multiplier", None),
            residual_multiplier=getattr(c, "residual_multiplier", 1.0),
            logits_scaling=getattr(c, "logits_scaling", 1.0),
        )


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, ctx: ModelContext, prefix: str):
        super().__init__()
        quant = ctx.quant.for_layer(f"{prefix}.qkv_proj", parts=("q_proj", "k_proj", "v_proj"))
        self.qkv_proj = QKVParallelLinear(a.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads, bias=a.qkv_bias,
                                          quant=quant, tp=ctx.tp)
        self.o_proj = RowParallelLinear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias,
                                        quant=ctx.quant.for_layer(f"{prefix}.o_proj"), tp=ctx.tp)
        self.q_size = self.qkv_proj.num_heads * a.head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * a.head_dim
        scale = a.attention_multiplier if a.attention_multiplier is not None else a.head_dim ** -0.5
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, a.head_dim, scale)

    def forward(self, rope: RopeTables, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(rope, q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, ctx: ModelContext, prefix: str):
        super().__init__()
        quant = ctx.quant.for_layer(f"{prefix}.gate_up_proj", parts=("gate_proj", "up_proj"))
        self.gate_up_proj = MergedColumnParallelLinear(a.hidden_size, [a.intermediate_size] * 2, bias=a.mlp_bias,
                                                       quant=quant, tp=ctx.tp)
        self.down_proj = RowParallelLinear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias,
                                           quant=ctx.quant.for_layer(f"{prefix}.down_proj"), tp=ctx.tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, ctx: ModelContext, prefix: str):
        super().__init__()
        self.self_attn = LlamaAttention(a, ctx, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(a, ctx, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.residual_multiplier = a.residual_multiplier

    def forward(self, rope: RopeTables, x: torch.Tensor, residual: Optional[torch.Tensor],
                meta: AttentionMetadata) -> Tuple[torch.Tensor, torch.Tensor]:
        # `residual` holds the running sum; each norm adds the previous block's output into it.
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self._scaled(self.self_attn(rope, x, meta))
        x, residual = self.post_attention_layernorm(x, residual)
        return self._scaled(self.mlp(x)), residual

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Granite's residual_multiplier. At 1.0 (every other model) the product is x itself, but as
        a kernel it cost two launches a layer: 0.07 ms of a 4.27 ms batch-1 decode step on an H200."""
        return x if self.residual_multiplier == 1.0 else x * self.residual_multiplier


class LlamaForCausalLM(nn.Module):
    """The decoder and its head. A vision-language model wraps it with its decoder config
    (`config`) and the checkpoint prefix of its decoder (`prefix`)."""

    # checkpoint name -> (our fused module, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, ctx: ModelContext, config: Any = None, prefix: str = "model"):
        super().__init__()
        top = ctx.hf_config
        text = config if config is not None else ctx.text_config
        a = self.args = LlamaArgs.from_hf(text, (getattr(top, "architectures", None) or [""])[0])
        # a vision-language model states tie_word_embeddings on its top-level config
        a.tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", None)
                                     or getattr(top, "tie_word_embeddings", None))
        self.tp, self.prefix = ctx.tp, prefix
        self.vocab_size = a.vocab_size
        max_positions = ctx.max_model_len or a.max_positions  # no position ever reaches max_model_len
        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size, ctx.tp)
        # embeddings, norms and lm_head stay in the model dtype; the linear layers are stored as
        # ctx.quant says for each (a checkpoint's ignore list may keep some in full precision)
        self.rotary = RotaryEmbedding(a.head_dim, max_positions, a.rope)  # one table for all layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(a, ctx, f"{prefix}.layers.{i}") for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size, ctx.tp)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def checkpoint_name(self, name: str) -> str:
        """HF names carry the decoder's prefix (`model.`) on everything but lm_head."""
        return name if name.startswith("lm_head") else f"{self.prefix}.{name}"

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """positions: [T], or [3, T] under M-RoPE. inputs_embeds: a multimodal model's text
        embeddings with its encoder outputs merged in (then input_ids are not read)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.args.embedding_multiplier != 1.0:
            x = x * self.args.embedding_multiplier
        rope = self.rotary(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)
        return logits / self.args.logits_scaling if self.args.logits_scaling != 1.0 else logits

    def decoder_shape(self) -> DecoderShape:
        """The widths the planner's activation estimate (memory/activation.py) follows."""
        a = self.args
        return DecoderShape(
            vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
            num_layers=a.num_layers, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
            max_positions=a.max_positions, tie_word_embeddings=a.tie_word_embeddings, qkv_bias=a.qkv_bias,
            o_bias=a.o_bias, mlp_bias=a.mlp_bias, logits_scaling=a.logits_scaling,
            embedding_multiplier=a.embedding_multiplier)

"""Fuyu: image patches projected by one linear layer straight into a Persimmon decoder.

Facts from HF's modeling_fuyu.py / modeling_persimmon.py:
- no vision tower: each 30x30x3 patch (2700 values, the processor's `image_patches` /
  `pixel_values`) goes through `vision_embed_tokens` (Linear 2700 -> hidden, with bias);
- the processor writes an image as rows of `|SPEAKER|` tokens, each row closed by a `|NEWLINE|`
  token, then `<s>`; only the `|SPEAKER|` rows take patch embeddings, the newline and `<s>` keep
  their text embeddings (an item's run carries its token ids: multimodal/processor.py);
- the decoder (Persimmon): LayerNorm (with bias) everywhere, one fused `query_key_value`
  projection laid out head by head as [heads, (q, k, v), head_dim], q and k LayerNorm-ed per
  head, rotary on the first `partial_rotary_factor` of each head's dims only, a biased `dense`
  output projection, and an MLP of relu(x)^2 between two biased linears; the head is not tied.

Checkpoints (as published and as transformers 5 writes them) name the decoder
`language_model.model.*`, the head `language_model.lm_head`, the projection `vision_embed_tokens`.
With the image limit 0 the projection is never built and its tensors are skipped unread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.errors import UserError
from framework.layers.attention import Attention, AttentionMetadata
from framework.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from framework.layers.linear import ColumnParallelLinear, RowParallelLinear
from framework.layers.rotary import RopeTables, RotaryEmbedding, rope_parameters
from framework.memory.shape import DecoderShape
from framework.models.context import ModelContext

MODALITIES = ("image",)
PATCH_KEYS = ("pixel_values", "image_patches")  # transformers' new and legacy output names


@dataclass
class PersimmonArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rotary_dim: int
    layer_norm_eps: float
    max_positions: int
    rope: Dict[str, Any]
    qk_layernorm: bool

    @classmethod
    def from_hf(cls, c: Any) -> "PersimmonArgs":
        act = getattr(c, "hidden_act", "relu2")
        if act != "relu2":
            raise UserError(f"Fuyu: hidden_act {act!r} is not supported; supported: relu2")
        rope = rope_parameters(c)
        factor = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 0.5))
        head_dim = c.hidden_size // c.num_attention_heads
        rotary_dim = int(head_dim * factor)
        if rotary_dim % 2 or rotary_dim <= 0:
            raise UserError(f"Fuyu: partial_rotary_factor {factor} gives {rotary_dim} rotary dims of {head_dim}; "
                            "it must be a positive even number")
        return cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, head_dim=head_dim,
                   rotary_dim=rotary_dim, layer_norm_eps=c.layer_norm_eps, max_positions=c.max_position_embeddings,
                   rope=rope, qk_layernorm=bool(getattr(c, "qk_layernorm", True)))


class PartialRotaryEmbedding(RotaryEmbedding):
    """Rotary over the first `rotary_dim` of `head_dim` dims, through the full-width kernel.

    HF rotates dims [0, R) as pairs (i, i + R/2) and passes the rest through; our kernel
    (kernels.rotary_store_kv) pairs (j, j + D/2) over the whole head. Reordering q's and k's dims
    the same way (`perm`) maps one onto the other: pair i < R/2 moves to (i, D/2 + i) and the
    passed-through dims fill the other slots, whose frequency is 0 (cos 1, sin 0). q.k, and so
    attention, is unchanged by a permutation applied to both; v is not touched."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, params: Dict[str, Any]):
        super().__init__(rotary_dim, max_positions, params)
        half, r = head_dim // 2, rotary_dim // 2
        self.cos = F.pad(self.cos, (0, half - r), value=1.0)
        self.sin = F.pad(self.sin, (0, half - r), value=0.0)
        passed = list(range(rotary_dim, head_dim))
        perm = list(range(r)) + passed[:half - r] + list(range(r, rotary_dim)) + passed[half - r:]
        self.register_buffer("perm", torch.tensor(perm), persistent=False)


class PersimmonAttention(nn.Module):
    def __init__(self, a: PersimmonArgs, ctx: ModelContext, prefix: str):
        super().__init__()
        # [heads, (q, k, v), head_dim] rows: a contiguous slice of rows is whole heads, so TP
        # splits the fused weight as it is stored
        self.query_key_value = ColumnParallelLinear(a.hidden_size, 3 * a.hidden_size, bias=True,
                                                    quant=ctx.quant.for_layer(f"{prefix}.query_key_value"), tp=ctx.tp)
        self.dense = RowParallelLinear(a.hidden_size, a.hidden_size, bias=True,
                                       quant=ctx.quant.for_layer(f"{prefix}.dense"), tp=ctx.tp)
        self.num_heads, self.head_dim = a.num_heads // ctx.tp.size, a.head_dim
        if a.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(a.head_dim, eps=a.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(a.head_dim, eps=a.layer_norm_eps)
        self.qk_layernorm = a.qk_layernorm
        self.attn = Attention(self.num_heads, self.num_heads, a.head_dim, a.head_dim ** -0.5)

    def forward(self, rope: RopeTables, perm: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(x).view(-1, self.num_heads, 3, self.head_dim).unbind(2)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = q.index_select(-1, perm), k.index_select(-1, perm)  # see PartialRotaryEmbedding
        return self.dense(self.attn(rope, q, k, v.contiguous(), meta))


class PersimmonMLP(nn.Module):
    def __init__(self, a: PersimmonArgs, ctx: ModelContext, prefix: str):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(a.hidden_size, a.intermediate_size, bias=True,
                                                  quant=ctx.quant.for_layer(f"{prefix}.dense_h_to_4h"), tp=ctx.tp)
        self.dense_4h_to_h = RowParallelLinear(a.intermediate_size, a.hidden_size, bias=True,
                                               quant=ctx.quant.for_layer(f"{prefix}.dense_4h_to_h"), tp=ctx.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(torch.square(F.relu(self.dense_h_to_4h(x))))


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, a: PersimmonArgs, ctx: ModelContext, prefix: str):
        super().__init__()
        self.self_attn = PersimmonAttention(a, ctx, f"{prefix}.self_attn")
        self.mlp = PersimmonMLP(a, ctx, f"{prefix}.mlp")
        self.input_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, rope: RopeTables, perm: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(rope, perm, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class FuyuForCausalLM(nn.Module):
    modalities = MODALITIES
    packed_modules: Dict[str, Tuple[str, Any]] = {}  # the checkpoint's qkv is fused already
    prefix = "language_model.model"

    def __init__(self, ctx: ModelContext):
        super().__init__()
        top = ctx.hf_config
        a = self.args = PersimmonArgs.from_hf(ctx.text_config)
        self.vocab_size = a.vocab_size
        self.image_token_id = int(getattr(top, "image_token_id", None) or 71011)
        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size, ctx.tp)
        self.rotary = PartialRotaryEmbedding(a.head_dim, a.rotary_dim, ctx.max_model_len or a.max_positions, a.rope)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(a, ctx, f"{self.prefix}.layers.{i}")
                                    for i in range(a.num_layers))
        self.final_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size, ctx.tp)
        if getattr(top, "tie_word_embeddings", False) or getattr(ctx.text_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight  # Fuyu-8B does not tie; a config may
        self.patch_dim = top.patch_size * top.patch_size * top.num_channels
        # unquantized whatever quantization.method says, replicated on every rank
        self.vision_embed_tokens = (None if ctx.language_model_only(MODALITIES)
                                    else nn.Linear(self.patch_dim, a.hidden_size))

    def vision_modules(self) -> list:
        return [] if self.vision_embed_tokens is None else [self.vision_embed_tokens]

    def checkpoint_name(self, name: str) -> str:
        if name.startswith("vision_embed_tokens"):
            return name
        return f"language_model.{name}" if name.startswith("lm_head") else f"{self.prefix}.{name}"

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def embed_multimodal(self, items: Sequence[Tuple[str, Mapping[str, torch.Tensor]]]) -> List[torch.Tensor]:
        """Each image's whole run [run tokens, hidden]: its patches projected at the `|SPEAKER|`
        positions, the text embeddings of its newline tokens and `<s>` elsewhere."""
        if self.vision_embed_tokens is None:
            raise RuntimeError("vision_embed_tokens was not built (every image limit is 0)")
        weight = self.vision_embed_tokens.weight
        outs = []
        for _, data in items:
            patches = next(data[k] for k in PATCH_KEYS if k in data).to(weight.device, weight.dtype)
            run = data["run_token_ids"].to(weight.device)
            out = self.embed_tokens(run)
            image = run == self.image_token_id
            if int(image.sum()) != patches.shape[0]:
                raise ValueError(f"Fuyu: {patches.shape[0]} patches for {int(image.sum())} image tokens")
            out[image] = self.vision_embed_tokens(patches).to(out.dtype)
            outs.append(out)
        return outs

    def dummy_multimodal_input(self, num_tokens: int) -> Tuple[str, Dict[str, torch.Tensor]]:
        """An image of `num_tokens` patches (zero pixels), for the memory profile."""
        return "image", {"pixel_values": torch.zeros(num_tokens, self.patch_dim),
                         "run_token_ids": torch.full((num_tokens,), self.image_token_id)}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope, perm = self.rotary(positions), self.rotary.perm
        for layer in self.layers:
            x = layer(rope, perm, x, meta)
        return self.final_layernorm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def decoder_shape(self) -> DecoderShape:
        a, tied = self.args, self.lm_head.weight is self.embed_tokens.weight
        return DecoderShape(
            vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
            num_layers=a.num_layers, num_heads=a.num_heads, num_kv_heads=a.num_heads, head_dim=a.head_dim,
            max_positions=a.max_positions, tie_word_embeddings=tied, qkv_bias=True, o_bias=True, mlp_bias=True,
            logits_scaling=1.0, embedding_multiplier=1.0)

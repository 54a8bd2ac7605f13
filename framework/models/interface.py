"""What the engine, the CUDA graphs, the loader and the planner rely on a model to provide.

A model class is registered by its HF `architectures` name (models/registry.py) and built as
`Model(ctx)` from a ModelContext (models/context.py): rank and TP size, the per-layer
quantization resolver, dtype, max_model_len, multimodal settings. It reads nothing else.

Required:
- `forward(input_ids [T], positions [T] or [3, T], meta, inputs_embeds=None [T, hidden]) -> hidden [T, hidden]`
- `compute_logits(hidden [R, hidden]) -> logits [R, vocab]` (the full vocabulary on every rank)
- `embed_input_ids(input_ids [T]) -> [T, hidden]` (a multimodal step merges encoder outputs into it)
- `vocab_size: int`
- `checkpoint_name(our_parameter_name) -> checkpoint_name` and `packed_modules`
  ({checkpoint part: (our fused module, shard id)}) for the loader
- one `layers.attention.Attention` module per layer that keeps KV; its `spec` (full attention or a
  sliding window of W tokens, KV heads and head size on this rank) is what the KV cache layout
  and the planner follow
- `decoder_shape() -> memory.shape.DecoderShape`: the widths the planner's activation estimate
  (memory/activation.py) is computed from; weights and KV are counted from the model itself,
  built on the `meta` device (memory/planner.py)

Optional (multimodal models; models/qwen2_5_vl.py is the example):
- `modalities` (("image", "video")) and `vision_modules()` (the tower and projector, [] when the run
  is text-only: then they are never built, and the loader skips their tensors unread)
- `embed_multimodal([(modality, processor outputs), ...])`: each item's embeddings [tokens, hidden],
  one row per token of its run (a run holding other tokens than the placeholder, as Fuyu's
  newline tokens, carries its ids as `run_token_ids`: their rows are their text embeddings)
- `dummy_multimodal_input(num_tokens)`: one item of that many tokens, for the memory profile
- `uses_mrope = True` and `mrope_positions(num_tokens, [(offset, modality, outputs), ...])`: a
  prompt's [3, T] positions and its decode delta; steps give 3-row positions for its prompt tokens
- `bidirectional_mm_run_tokens: int` (> 0: Gemma-3): each maximal run of an item's embedding tokens
  attends to itself both ways, and has at most this many tokens. The scheduler keeps such a run in
  one prefill chunk (max_num_batched_tokens must hold it; checked before weights are read), and
  the step gives attention each token's causal limit (AttentionMetadata.causal_limits)

Optional (a checkpoint layout other than transformers'): `checkpoint_tensors(name, tensor)` yields
(transformers' name, tensor) pairs for one checkpoint tensor, renamed or split (models/internvl_chat.py).

A new architecture touches its model file and the registry; nothing else describes it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Union

import torch
from torch import nn

from framework.layers.attention import Attention, AttentionSpec
from framework.models.context import ModelContext
from framework.models.registry import model_class


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(ctx: ModelContext, device: Union[str, torch.device]) -> nn.Module:
    """The registered class for ctx.hf_config, its tensors created on `device` in ctx.dtype
    (`meta`: shapes only, no memory: what the planner counts)."""
    cls = model_class(ctx.hf_config)
    with torch.device(device), default_dtype(ctx.dtype):
        return cls(ctx).eval()


def attention_layers(model: nn.Module) -> List[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def attention_specs(model: nn.Module) -> List[AttentionSpec]:
    return [layer.spec for layer in attention_layers(model)]

"""Peak activation bytes of one forward step, counted from what our forward allocates.

The count follows models/llama.py line by line (T = tokens in the step, h = hidden, q/kv =
query/KV width per rank, i = intermediate per rank; widths in elements of the model dtype):

- While a decoder layer runs, its caller still holds the previous layer's x and residual (2h),
  and the layer holds its own normed x and residual (2h): 4h is the floor of every phase.
- Attention: qkv output (q + 2kv; q/k/v are views of it, v keeps it alive), rotated q and k
  (new tensors, q + kv), the attention output (q) and o_proj's output (h): 5h + 3q + 3kv.
- MLP: gate_up output (2i) and the activation's output (i); on the torch reference backend
  (CPU) silu(gate) is one more i: 4h + 3i (GPU), 4h + 4i (CPU).
- Residual scaling and the fused add-norm: 6h at most.
- Logits, after the layers: the final hidden (T x h) is still alive in ModelRunner.execute,
  plus the selected rows, this rank's logits slice, the all-gather's parts and their
  concatenation (TP > 1), Granite's division, and the float32 copy (S rows x vocab).
- The CPU backend's reference attention materializes what the Triton kernels never do: per
  prefilling sequence float32 K/V of its whole context and SDPA's math path (2.5 x the scores,
  measured on torch 2.13 with a boolean mask); for decode rows a dense K/V gather of the batch.
- Weight-only fp8/int8 cast the codes to the model dtype inside the matmul (one weight-sized
  transient) and keep the unscaled output beside the scaled one; int4 does the same on CPU.

The engine's own profile (ModelRunner.profile_run) computes one logits row; we count
`logits_rows` (max_num_seqs) because every decode step computes that many.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.memory.shape import DecoderShape
from framework.memory.weights import decoder_linears, kv_heads_per_rank

SDPA_MATH_FACTOR = 2.5  # CPU SDPA with a boolean mask: peak / (scores in float32), measured 2.45
GRAPH_BYTES_EACH = 4 << 20  # per captured size: segment rounding and its static outputs (estimate)


@dataclass(frozen=True)
class Step:
    tokens: int  # T: max_num_batched_tokens
    logits_rows: int  # S: sequences sampled in one step (<= max_num_seqs)
    context: int  # the longest context a query attends to (max_model_len)
    kv_tokens: int  # KV cache capacity: bounds what decode rows can attend to in all
    block_size: int


def _widths(s: DecoderShape, tp: int):
    q = s.num_heads // tp * s.head_dim
    kv = kv_heads_per_rank(s.num_kv_heads, tp) * s.head_dim
    return s.hidden_size, q, kv, s.intermediate_size // tp


def _largest_linear(s: DecoderShape, tp: int) -> int:
    return max(out * inp for _, out, inp in decoder_linears(s, tp))


def layer_peak(s: DecoderShape, tp: int, tokens: int, a: int, quant: str, reference: bool) -> int:
    """Bytes alive at the worst point inside one decoder layer."""
    h, q, kv, i = _widths(s, tp)
    mlp = 4 * h + (4 if reference else 3) * i
    attention = 5 * h + 3 * q + 3 * kv
    extra_weight = 0
    if quant in ("fp8", "int8"):  # scaled_linear: codes.to(dtype), then y * scale beside y
        mlp = max(mlp, 4 * h + 4 * i)
        attention = max(attention, 4 * h + 2 * (q + 2 * kv))
        extra_weight = _largest_linear(s, tp) * a
    elif quant == "int4" and reference:  # dequantize_int4: int8 codes, the cast and the product
        extra_weight = _largest_linear(s, tp) * (2 * a + 2)
    return tokens * max(mlp, attention, 6 * h) * a + extra_weight


def reference_attention_peak(s: DecoderShape, tp: int, step: Step, a: int, kv_bytes: int) -> int:
    """Temporaries of kernels' torch reference attention (the CPU backend), beyond layer_peak."""
    h, q, kv, _ = _widths(s, tp)
    heads = s.num_heads // tp
    group = heads // kv_heads_per_rank(s.num_kv_heads, tp)
    ctx = step.context
    q_len = min(step.tokens, ctx)
    cast = 0 if kv_bytes == 4 else 4  # .float() copies unless the cache is float32 already
    # prefill: one sequence at a time: K and V of its context, the regrouped queries, the masks
    prefill = (2 * ctx * kv * (kv_bytes + cast) + q_len * q * 4 + 2 * group * q_len * ctx
               + int(SDPA_MATH_FACTOR * heads * q_len * ctx * 4))
    # decode rows: a dense [B, ctx] gather of K (kept) and V (plus its masked copy)
    rows_ctx = min(step.logits_rows * ctx, step.kv_tokens)
    decode = rows_ctx * kv * (3 * kv_bytes + 2 * cast) + int(SDPA_MATH_FACTOR * heads * rows_ctx * 4)
    return max(prefill, decode)


def logits_peak(s: DecoderShape, tp: int, step: Step, a: int) -> int:
    """Bytes alive while ModelRunner.execute turns hidden states into float32 logits."""
    rows = step.logits_rows
    vocab_rank = -(-s.vocab_size // tp)
    peak = step.tokens * s.hidden_size * a + rows * s.hidden_size * a + rows * vocab_rank * a
    if tp > 1:  # all_gather_last_dim: tp parts, then their concatenation
        peak += 2 * tp * rows * vocab_rank * a
    if s.logits_scaling != 1.0:
        peak += rows * vocab_rank * tp * a
    if a != 4:
        peak += rows * s.vocab_size * 4
    return peak


def step_input_bytes(step: Step) -> int:
    """ids, positions and slot mapping (int64 per token) and the block tables (int32)."""
    return 24 * step.tokens + 4 * step.logits_rows * -(-step.context // step.block_size)


def forward_peak(s: DecoderShape, tp: int, step: Step, a: int, kv_bytes: int, quant: str,
                 reference: bool, logits: bool = True) -> int:
    """Peak bytes of one step on top of weights and KV cache."""
    layer = layer_peak(s, tp, step.tokens, a, quant, reference)
    if reference:
        layer += reference_attention_peak(s, tp, step, a, kv_bytes)
    embed = step.tokens * s.hidden_size * a * (2 if s.embedding_multiplier != 1.0 else 1)
    peak = max(layer, embed, logits_peak(s, tp, step, a) if logits else 0)
    return peak + step_input_bytes(step)


def capture_sizes(configured, max_num_seqs: int) -> list:
    """compilation.cudagraph_capture_sizes, or 1, 2, 4, 8 then steps of 8 up to max_num_seqs (256 at most)."""
    top = min(max_num_seqs, 256)
    if configured:
        return [b for b in configured if b <= max(top, min(configured))]
    return [b for b in [1, 2, 4, 8] + list(range(16, 257, 8)) if b <= top] or [1]


def graph_pool_bytes(s: DecoderShape, tp: int, sizes: list, step: Step, a: int, kv_bytes: int, quant: str) -> int:
    """Decode graphs share one private pool that keeps the largest capture's live tensors: a
    decode forward at the largest size (logits are computed outside the graph, as nano-vllm and
    vLLM do), plus GRAPH_BYTES_EACH per captured size. An estimate until the graph runner lands."""
    largest = max(sizes)
    decode = Step(tokens=largest, logits_rows=largest, context=step.context, kv_tokens=step.kv_tokens,
                  block_size=step.block_size)
    return forward_peak(s, tp, decode, a, kv_bytes, quant, reference=False, logits=False) + \
        GRAPH_BYTES_EACH * len(sizes)

"""Peak activation bytes of one forward step, counted from what our forward allocates.

The count follows models/llama.py line by line (T = tokens in the step, h = hidden, q/kv =
query/KV width per rank, i = intermediate per rank; widths in elements of the model dtype):

- While a decoder layer runs, its caller still holds the previous layer's x and residual (2h),
  and the layer holds its own normed x and residual (2h): 4h is the floor of every phase.
- Attention: qkv output (q + 2kv; q/k/v are views of it, v keeps it alive), the rotated q (a
  new tensor, q; the rotated k goes straight into the cache, kernels/rotary_kv.py), the
  attention output (q) and o_proj's output (h): 5h + 3q + 2kv.
- MLP: gate_up output (2i) and the activation's output (i); on the torch reference backend
  (CPU) silu(gate) is one more i: 4h + 3i (GPU), 4h + 4i (CPU).
- Residual scaling and the fused add-norm: 6h at most.
- Logits, after the layers: the final hidden (T x h) is still alive in ModelRunner.execute,
  plus the selected rows, this rank's logits slice, the all-gather's parts and their
  concatenation (TP > 1), Granite's division, and the float32 copy (S rows x vocab).
- The CPU backend's reference attention materializes what the Triton kernels never do: per
  prefilling sequence float32 K/V of its whole context and SDPA's math path (2.5 x the scores,
  measured on torch 2.13 with a boolean mask); for decode rows a dense K/V gather of the batch
  (kernels/decode_attention.gather_kv, masked in place).
- Weight-only fp8/int8 cast the codes to the model dtype inside the matmul (one weight-sized
  transient, counted in that matmul's phase) and keep the unscaled output beside the scaled
  one; int4 unpacks to a full-precision copy. On GPU, a matmul over few rows (decode) runs the
  fused kernel of kernels/quant_matmul.py instead, which makes no copy. fp8 on a card with fp8
  tensor cores (bf16/fp16 model) runs W8A8 above 32 rows (kernels/fp8_linear.py): no weight
  copy, no unscaled output, only x's fp8 codes and row scales (T x (K + 4) bytes); int8 on any
  CUDA card likewise (kernels/int8_linear.py), plus its int32 sums (T x N x 4 bytes).

Checked against the engine's own profile (ModelRunner.profile_run, which scores min(tokens,
max_num_seqs) rows as we do) on an H100: Llama-3.1-8B measured 0.260 / 0.908 GiB at 2048 / 8192
tokens a step, planned 0.258 / 0.907.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from framework.memory.shape import DecoderShape
from kernels.attention import QUERY_CHUNK

SDPA_MATH_FACTOR = 2.5  # CPU SDPA with a boolean mask: peak / (scores in float32), measured 2.45
CUBLAS_WORKSPACE_BYTES = 32 << 20  # cuBLAS takes it from torch's allocator at the first matmul (Hopper)
GRAPH_POOL_SLACK_BYTES = 20 << 20  # the pool's allocator segments round up (one 20 MiB segment)
GRAPH_BYTES_EACH = 2 << 20  # each captured graph's own device memory, outside torch's allocator


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    return max(1, num_kv_heads // tp)


def decoder_linears(s: DecoderShape, tp: int) -> List[Tuple[str, int, int]]:
    """(name, out_features, in_features) of one layer's linear weights on one rank: the sizes of
    the full-precision copies a quantized matmul makes (layers/linear.py slices them so)."""
    q_out = s.num_heads // tp * s.head_dim
    kv_out = kv_heads_per_rank(s.num_kv_heads, tp) * s.head_dim
    inter = s.intermediate_size // tp
    return [("qkv_proj", q_out + 2 * kv_out, s.hidden_size),
            ("o_proj", s.hidden_size, s.num_heads * s.head_dim // tp),
            ("gate_up_proj", 2 * inter, s.hidden_size),
            ("down_proj", s.hidden_size, inter)]


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


def fused_quant_rows() -> int:
    """Up to how many rows a quantized matmul on GPU runs the fused kernel, which reads the codes
    and makes no weight copy (kernels/quant_matmul.SMALL_M); 0 where that kernel is absent."""
    try:
        from kernels.quant_matmul import SMALL_M
    except ImportError:
        return 0
    return SMALL_M


def int4_dequant_rows() -> int:
    """From how many rows an int4 matmul on GPU unpacks its weight for cuBLAS (below: w4a16_matmul)."""
    from framework.layers.quantization.int4 import DEQUANT_ROWS
    return DEQUANT_ROWS


def w8a8_fp8(quant: str, reference: bool, a: int) -> bool:
    """quantization=fp8 runs W8A8 (layers/quantization/fp8.py): on this machine's GPU if it has
    fp8 tensor cores (compute capability >= 8.9) and the model is bf16/fp16; quantization=int8
    (int8.py) on any CUDA GPU. Planning on a machine without that GPU counts the weight-only
    path, which needs more. (The name stayed when int8 joined.)"""
    if quant not in ("fp8", "int8") or reference or a != 2 or not torch.cuda.is_available():
        return False
    return quant == "int8" or torch.cuda.get_device_capability() >= (8, 9)


def weight_only_rows() -> int:
    """Up to how many rows fp8 and int8 stay weight-only on a card where they run W8A8."""
    from framework.layers.quantization.fp8 import WEIGHT_ONLY_MAX_ROWS
    from framework.layers.quantization.int8 import WEIGHT_ONLY_MAX_ROWS as INT8_ROWS
    assert INT8_ROWS == WEIGHT_ONLY_MAX_ROWS, "the planner counts one threshold for both"
    return WEIGHT_ONLY_MAX_ROWS


def dequantized_bytes(s: DecoderShape, tp: int, a: int, quant: str, reference: bool, rows: int,
                      group_size: int) -> dict:
    """The full-precision copy of each linear weight that one quantized matmul over `rows` rows
    makes: fp8/int8 cast their codes to the model dtype (scaled_linear); int4 as `int4_copy_bytes`
    says. None on GPU for few rows.
    W8A8 copies x instead, to its 8-bit codes and float32 row scales; int8's also holds the int32
    sums (rows x out x 4 bytes) until its epilogue has written the output."""
    if rows > weight_only_rows() and w8a8_fp8(quant, reference, a):
        sums = 4 if quant == "int8" else 0
        return {name: rows * (inp + 4 + sums * out) for name, out, inp in decoder_linears(s, tp)}
    if quant == "int4":
        per = int4_copy_bytes(rows, group_size, a, reference)
    elif quant not in ("fp8", "int8") or (not reference and rows <= fused_quant_rows()):
        per = 0
    else:
        per = a
    return {name: out * inp * per for name, out, inp in decoder_linears(s, tp)}


def int4_copy_bytes(rows: int, group: int, a: int, reference: bool) -> int:
    """Bytes a weight of the copy an int4 matmul over `rows` rows makes, as int4_linear dispatches
    (layers/quantization/int4.py): none where a kernel reads the codes (the GEMV, tinygemm and
    quant_matmul up to SMALL_M rows; w4a16_matmul below DEQUANT_ROWS, for the group sizes it has
    a tile for), the model dtype where Triton unpacks for cuBLAS, and the torch reference's int8
    codes and model-dtype weight where no kernel takes the group size (or on the CPU)."""
    if reference or not fused_quant_rows():
        return 2 * a + 2
    from kernels.quant_matmul import supported_group  # present: fused_quant_rows() found the module
    from kernels.w4a16_matmul import tile_for

    if not supported_group(group):
        return 2 * a + 2
    if rows <= fused_quant_rows() or (rows < int4_dequant_rows() and tile_for(group) is not None):
        return 0
    return a


def layer_peak(s: DecoderShape, tp: int, tokens: int, a: int, quant: str, reference: bool,
               group_size: int) -> int:
    """Bytes alive at the worst point inside one decoder layer: the worst of its phases, a
    quantized matmul's weight copy counted in the phase of that matmul."""
    h, q, kv, i = _widths(s, tp)
    w = dequantized_bytes(s, tp, a, quant, reference, tokens, group_size)
    # scaled_linear keeps its output y beside y * scale (the fused kernel scales inside)
    scaled = quant in ("fp8", "int8") and (reference or tokens > fused_quant_rows()) \
        and not (tokens > weight_only_rows() and w8a8_fp8(quant, reference, a))
    act = (4 if reference else 3) * i
    widths = [  # elements per token alive in each phase
        5 * h + 3 * q + 2 * kv + (h if scaled else 0),  # attention, up to o_proj's output
        4 * h + max(act, 4 * i if scaled else 0),  # gate_up, then the activation
        6 * h,  # residual scaling and the fused add-norm
    ]
    with_weight = [  # a quantized matmul's phase: its input, its output, its weight copy
        tokens * (4 * h + (q + 2 * kv) * (2 if scaled else 1)) * a + w["qkv_proj"],
        tokens * (5 * h + 3 * q + 2 * kv) * a + w["o_proj"],
        tokens * (4 * h + 2 * i) * a + w["gate_up_proj"],
        tokens * (5 * h + i) * a + w["down_proj"],
    ] if any(w.values()) else []
    return max([tokens * x * a for x in widths] + with_weight)


def reference_attention_peak(s: DecoderShape, tp: int, step: Step, a: int, kv_bytes: int) -> int:
    """Temporaries of kernels' torch reference attention (the CPU backend), beyond layer_peak."""
    h, q, kv, _ = _widths(s, tp)
    heads = s.num_heads // tp
    group = heads // kv_heads_per_rank(s.num_kv_heads, tp)
    ctx = step.context
    q_len = min(step.tokens, ctx)
    cast = 0 if kv_bytes == 4 else 4  # .float() copies unless the cache is float32 already
    # prefill: one sequence at a time: K and V of its context; then per chunk of at most
    # QUERY_CHUNK queries, the regrouped queries, the masks and SDPA's scores
    chunk = min(q_len, QUERY_CHUNK)
    prefill = (2 * ctx * kv * (kv_bytes + cast) + chunk * q * 4 + 2 * group * chunk * ctx
               + int(SDPA_MATH_FACTOR * heads * chunk * ctx * 4))
    # decode rows: a dense [B, ctx] gather of K (kept, as float32) while V is gathered and cast
    rows_ctx = min(step.logits_rows * ctx, step.kv_tokens)
    kept = 4 if cast else kv_bytes
    decode = rows_ctx * kv * (kept + kv_bytes + cast) + int(SDPA_MATH_FACTOR * heads * rows_ctx * 4)
    return max(prefill, decode)


def logits_peak(s: DecoderShape, tp: int, step: Step, a: int, to_float: bool = True) -> int:
    """Bytes alive while ModelRunner.execute turns hidden states into logits (and float32 ones:
    a CUDA graph stops before that cast)."""
    rows = step.logits_rows
    vocab_rank = -(-s.vocab_size // tp)
    peak = step.tokens * s.hidden_size * a + rows * s.hidden_size * a + rows * vocab_rank * a
    if tp > 1:  # all_gather_last_dim: tp parts, then their concatenation
        peak += 2 * tp * rows * vocab_rank * a
    if s.logits_scaling != 1.0:
        peak += rows * vocab_rank * tp * a
    if a != 4 and to_float:
        peak += rows * s.vocab_size * 4
    return peak


def step_input_bytes(step: Step) -> int:
    """ids, positions and slot mapping (int64 per token) and the block tables (int32)."""
    return 24 * step.tokens + 4 * step.logits_rows * -(-step.context // step.block_size)


def forward_peak(s: DecoderShape, tp: int, step: Step, a: int, kv_bytes: int, quant: str, group_size: int,
                 reference: bool, to_float: bool = True) -> int:
    """Peak bytes of one step on top of weights and KV cache (on a GPU, with cuBLAS's workspace,
    which the first matmul takes from torch's allocator). `group_size`: int4's."""
    layer = layer_peak(s, tp, step.tokens, a, quant, reference, group_size)
    if reference:
        layer += reference_attention_peak(s, tp, step, a, kv_bytes)
    embed = step.tokens * s.hidden_size * a * (2 if s.embedding_multiplier != 1.0 else 1)
    peak = max(layer, embed, logits_peak(s, tp, step, a, to_float))
    return peak + step_input_bytes(step) + (0 if reference else CUBLAS_WORKSPACE_BYTES)


def graph_pool_bytes(s: DecoderShape, tp: int, sizes: list, step: Step, a: int, kv_bytes: int, quant: str,
                     group_size: int) -> int:
    """engine/cuda_graphs.py: every graph runs forward + compute_logits of a pure decode batch and
    copies the logits into one static [largest size, vocab] buffer; the graphs share one pool,
    captured largest first, so the pool holds one decode step at the largest size. Plus the
    pool's segment rounding and each graph's own memory (measured on an H100: 0.057-0.074 GiB
    for Llama-3.1-8B at 11 sizes up to 64)."""
    largest = max(sizes)
    decode = Step(tokens=largest, logits_rows=largest, context=step.context, kv_tokens=step.kv_tokens,
                  block_size=step.block_size)
    static_logits = largest * s.vocab_size * a
    # A quantized model's dequantized weight copies (sizes above SMALL_M) reuse one block of the
    # pool, as the forward's peak assumes, since the runner turned on expandable segments: Llama-3.1-8B
    # at 19 sizes up to 128 measured 0.297 GiB (fp8) and 0.307 GiB (int4) on an H100, where each copy
    # kept its own block before (0.518 GiB for fp8).
    return (forward_peak(s, tp, decode, a, kv_bytes, quant, group_size, reference=False, to_float=False)
            - CUBLAS_WORKSPACE_BYTES + static_logits + GRAPH_POOL_SLACK_BYTES
            + GRAPH_BYTES_EACH * len(sizes))

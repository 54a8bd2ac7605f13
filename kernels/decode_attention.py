"""Split-K ("flash-decoding") paged attention for pure-decode batches (one query per sequence).

Why split: at decode a batch of B sequences gives only B * num_kv_heads programs, too few to
fill 132 SMs when B is small and contexts are long. Splitting each context into `num_splits`
contiguous chunks multiplies the parallelism; the last program of a sequence's chunks to finish
merges their partial softmax results (running max, sum and unnormalised output) exactly, so one
kernel does the whole attention.

Why CUDA-graph safe: `num_splits` is picked from Python ints only (shapes, an optional
`max_seq_len` hint, the block-table width), never from `seq_lens` values; each program reads its
sequence's real length on the device and simply idles when its chunk is empty.

GQA: one program handles every query head that shares a KV head, so each KV tile is read once.

Sliding window (`sliding_window` W > 0): a sequence of length L attends to keys max(0, L - W)..L-1
only; the splits cover that range, and block-table entries before it are never read (a window
layer may have freed those blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import next_pow2, num_sms, pdl, pdl_enter, tl, triton, zeroed_tickets

# Keys per inner-loop tile (>= 16: it is the K dim of the P @ V dot). Independent of the cache's
# block_size: keys are gathered per token through the block table, so any block_size works.
# Two tile configs, by regime (picked from num_splits, a Python int, so graphs stay valid):
# - one program per sequence and KV head (a large batch already fills the SMs): the kernel streams
#   K/V; 64 keys, 4 warps, 2 stages ran 237 us against 244 for 128/4/3 on H200 at 256 decodes of
#   the 8B shape with the head-major cache (bench_attention, BENCHMARKS.md issue 16, 2026-12-01);
# - sequences split into chunks (small batches): few tiles per program, so larger ones; 128 beat 64
#   by up to 12% on H100 at batch 1-8 (kernels/bench.py, 2026-11-25, the old cache layout).
BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 4, 2
SPLIT_BLOCK_N, SPLIT_NUM_STAGES = 128, 3
# A split shorter than this costs more in the merge than it wins in parallelism.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr, tickets_ptr,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,  # cache block size; constexpr so // and % become shifts
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,        # query heads per KV head
    BLOCK_G: tl.constexpr,      # GROUP padded to a power of two >= 16 (tl.dot minimum)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WINDOW: tl.constexpr,       # 0: every key; > 0: the last WINDOW keys
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)

    # Chunk boundaries come from this sequence's own (windowed) key range, rounded to whole tiles.
    if WINDOW > 0:
        kv_start = tl.maximum(seq_len - WINDOW, 0)
    else:
        kv_start = seq_len * 0
    base = kv_start // BLOCK_N * BLOCK_N
    tiles = tl.cdiv(seq_len - base, BLOCK_N)
    chunk = tl.cdiv(tiles, NUM_SPLITS) * BLOCK_N
    start = base + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = (n < end) & (n >= kv_start)
        # Never dereference block-table entries outside the keys read: past the sequence they may
        # hold -1 or junk, before a window they may name freed blocks.
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        off = (n % BLOCK_SIZE).to(tl.int64)
        kv_mask = n_ok[None, :] & d_ok[:, None]
        # This head's keys of one block are one contiguous [BLOCK_SIZE, D] run (kernels/kv_cache.py).
        kt = tl.load(k_cache_ptr + blk[None, :] * stride_kb + kvh * stride_kh
                     + off[None, :] * stride_ks + d[:, None], mask=kv_mask, other=0.0)  # [D, N]
        s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + kvh * stride_vh
                    + off[:, None] * stride_vs + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=DOT_PRECISION)
        m_i = m_new

    row = (b * (GROUP * tl.num_programs(1)) + heads).to(tl.int64)  # flat (b, head) index
    if NUM_SPLITS == 1:
        # No merge needed: normalise and write the answer (0 for an empty sequence).
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # Partials: acc unnormalised; (m, l) in log2 units. Empty chunks store m=-inf, l=0.
        part = row * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=g_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_ok)
        # The last of this (sequence, KV head)'s splits to finish merges them, so a decode step
        # launches one attention kernel a layer, not two. The barrier orders every thread's partial
        # stores before the ticket's release; the ticket's acquire orders the merge's loads after
        # the other splits' stores, which are read from L2 (.cg: another SM wrote them).
        tl.debug_barrier()
        ticket_ptr = tickets_ptr + b * tl.num_programs(1) + kvh
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == NUM_SPLITS - 1:
            tl.store(ticket_ptr, 0)  # ready for the next call (and the next graph replay)
            _merge_splits(out_ptr, part_acc_ptr, part_ml_ptr, row, g_ok, d, d_ok,
                          NUM_SPLITS, BLOCK_G, BLOCK_D, HEAD_DIM)


@triton.jit
def _merge_splits(out_ptr, part_acc_ptr, part_ml_ptr, row, g_ok, d, d_ok,
                  NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """Rescale each split's partial to the heads' global max and sum them (exact)."""
    first = row * NUM_SPLITS
    m_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.load(part_ml_ptr + (first + s) * 2, mask=g_ok, other=float("-inf"), cache_modifier=".cg")
        m_max = tl.maximum(m_max, m)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all chunks empty: keep exp2 finite
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    o = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(NUM_SPLITS):
        part = first + s
        w = tl.exp2(tl.load(part_ml_ptr + part * 2, mask=g_ok, other=float("-inf"), cache_modifier=".cg") - m_max)
        l_sum += tl.load(part_ml_ptr + part * 2 + 1, mask=g_ok, other=0.0, cache_modifier=".cg") * w
        acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], mask=g_ok[:, None], other=0.0,
                      cache_modifier=".cg")
        o += acc * w[:, None]
    o = o / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs get exact fp32 dots (tests, fp32 models); tf32 would cost ~3 digits."""
    return "ieee" if dtype == torch.float32 else None


def pick_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits so that batch * kv_heads * splits covers the SMs about twice, from Python ints only."""
    sms = num_sms(device, off_gpu=8)
    want = -(-2 * sms // max(1, batch * num_kv_heads))  # ceil division, no Triton needed
    most = -(-max(1, max_seq_len) // MIN_KEYS_PER_SPLIT)
    return max(1, min(want, most, MAX_SPLITS))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
           block_tables: torch.Tensor) -> None:
    assert q.dim() == 3, "q must be [B, Hq, D]"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "cache [blocks, Hkv, bs, D]"
    assert q.shape[2] == k_cache.shape[3], "head_dim mismatch"
    assert q.shape[1] % k_cache.shape[1] == 0, "Hq must be a multiple of Hkv"
    assert seq_lens.shape == (q.shape[0],) and block_tables.shape[0] == q.shape[0]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton split-K decode attention: q `[B, Hq, D]` -> `[B, Hq, D]` (q's dtype).
    `block_n`, `num_warps`, `num_stages` override the tile config (kernels/bench_attention.py sweeps them).

    Each sequence attends to its keys 0..seq_lens[b]-1 (its new token's K/V already stored).
    `num_splits` defaults to a choice from the shapes and `max_seq_len` (a Python int upper
    bound on seq_lens; defaults to the block table's capacity), so no host sync happens and the
    call can be captured in a CUDA graph. A sequence with seq_len 0 yields zeros.
    """
    _check(q, k_cache, v_cache, seq_lens, block_tables)
    batch, hq, head_dim = q.shape
    hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((batch, hq, head_dim), dtype=q.dtype, device=q.device)
    assert out.shape == (batch, hq, head_dim) and out.is_contiguous()
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    if num_splits is None:
        if sliding_window:  # a window reads at most W keys (plus the tile they start in)
            max_seq_len = min(max_seq_len, sliding_window + max(block_n or 0, BLOCK_N, SPLIT_BLOCK_N))
        num_splits = pick_num_splits(batch, hkv, max_seq_len, q.device)
    block_n = block_n or (SPLIT_BLOCK_N if num_splits > 1 else BLOCK_N)
    num_stages = num_stages or (SPLIT_NUM_STAGES if num_splits > 1 else NUM_STAGES)
    group = hq // hkv
    block_d = max(16, next_pow2(head_dim))
    if num_splits > 1:
        part_acc = torch.empty((batch * hq * num_splits, block_d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch * hq * num_splits, 2), dtype=torch.float32, device=q.device)
        tickets = zeroed_tickets(q.device, batch * hkv)
    else:
        part_acc = part_ml = tickets = out  # unused placeholders
    _decode_split_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_acc, part_ml, tickets,
        scale * 1.4426950408889634,  # exp(x) = exp2(x * log2 e): exp2 is the fast instruction
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, GROUP=group, BLOCK_G=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), WINDOW=int(sliding_window or 0),
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages, **pdl(q.device)
    )
    return out


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
              max_len: int, starts: torch.Tensor | None = None) -> torch.Tensor:
    """Dense `[B, Hkv, max_len, D]` copy of each sequence's first max_len cache rows.

    Rows past a sequence's length (or before its `starts` row: outside a sliding window) are
    zeroed and their block-table entries replaced by block 0, so -1/junk/freed entries are never
    used as indices and stale or NaN slots can't leak into SDPA (a masked score of NaN would
    still poison the softmax).
    """
    num_kv_heads, block_size = cache.shape[1], cache.shape[2]
    batch, nblk = block_tables.shape[0], -(-max_len // block_size)
    lens = seq_lens.long()[:, None]
    lo = torch.zeros_like(lens) if starts is None else starts.long()[:, None]
    bt = block_tables[:, :nblk].long()
    blk_start = torch.arange(nblk, device=bt.device) * block_size
    bt = torch.where((blk_start < lens) & (blk_start + block_size > lo), bt, 0)
    # One index_select of whole blocks along the block dim of a head-major view: the copy comes
    # out [Hkv, B * nblk, bs, D], so each head's rows of a sequence are already in order and
    # no second (transposing) copy is needed. Padding rows are zeroed by index: several times
    # faster on CPU than a broadcast masked_fill.
    dense = cache.transpose(0, 1).index_select(1, bt.flatten())
    if dense.element_size() == 1:  # an fp8 cache: CPU indexing writes have no fp8 kernel
        dense = dense.float()
    dense = dense.reshape(num_kv_heads, batch, nblk * block_size, cache.shape[3])
    row = torch.arange(nblk * block_size, device=bt.device)
    seq, pad = ((row >= lens) | (row < lo)).nonzero(as_tuple=True)
    dense[:, seq, pad] = 0
    return dense[:, :, :max_len].transpose(0, 1)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Torch reference of `paged_decode_attention`: one batched SDPA over gathered K/V.

    `num_splits` and `max_seq_len` only steer the kernel; here the length comes from seq_lens
    (a host read, fine on the CPU backend).
    """
    _check(q, k_cache, v_cache, seq_lens, block_tables)
    batch, hq, head_dim = q.shape
    hkv = k_cache.shape[1]
    if out is None:
        out = torch.empty((batch, hq, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    max_len = int(seq_lens.max())
    if max_len == 0:
        return out.zero_()
    starts = (seq_lens - sliding_window).clamp(min=0) if sliding_window else None
    k = gather_kv(k_cache, block_tables, seq_lens, max_len, starts).float()  # [B, Hkv, L, D]
    v = gather_kv(v_cache, block_tables, seq_lens, max_len, starts).float()
    # GQA without repeating K/V: the G query heads of a KV head become G query rows.
    qg = q.float().view(batch, hkv, hq // hkv, head_dim)
    keep = torch.arange(max_len, device=q.device) < seq_lens[:, None]  # [B, L]
    if sliding_window:
        keep &= torch.arange(max_len, device=q.device) >= starts[:, None]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=keep[:, None, None, :], scale=scale)
    o = torch.where(seq_lens.view(batch, 1, 1, 1) > 0, o, 0.0)  # fully masked rows give NaN
    out.copy_(o.reshape(batch, hq, head_dim))
    return out

"""Paged causal attention for a mixed batch: prefill, chunked prefill, prefix hits and decode.

Inputs (B sequences, T new tokens in all):
  q             [T, Hq, D]   new tokens, sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
  k/v_cache     [num_blocks, Hkv, block_size, D], the new tokens' K/V already stored
  cu_seqlens_q  int32 [B+1]
  seq_lens      int32 [B]    total context per sequence, new tokens included
  block_tables  int32 [B, max_blocks]; entries past a sequence's blocks are never read
The i-th new token of sequence b sits at position seq_lens[b] - q_len_b + i and sees keys
0..that position; with `sliding_window` W > 0 only the last W of them (key n is seen from
position p when p - W < n <= p, HF's sliding-window mask). Keys before the first query's window
are never read, nor are their block-table entries: a window layer's blocks that no window
reaches any more may be freed. Query head h reads KV head h // (Hq // Hkv).

`causal_limits` [T] (optional; Gemma-3's images): the last key position each new token sees,
instead of its own position. A token inside a bidirectional run (an image's tokens, which attend
to each other both ways, as HF does) has the run's last position; every other token its own.
Key n is then visible from position p when n <= limit (and p - W < n for a window: HF ANDs the
window onto causal-or-same-image). The run must lie wholly in the step's new tokens (the
scheduler keeps it in one chunk). Without it (every other model) the kernel is compiled as
before: the limit is a constexpr branch, not a load.

Kernel shape: one program per (query tile, KV head). A query tile is BLOCK_Q consecutive tokens
of one sequence times the GROUP query heads of that KV head, flattened into BLOCK_M rows, so a
KV tile gathered from the paged cache feeds BLOCK_M rows at once (GQA reads KV once per group).
The programs are numbered across the whole batch without a host-side max_q_len: sequence b's
tiles start at cu_seqlens_q[b] // BLOCK_Q + b, an upper bound that wastes at most one tile per
sequence, and each program finds its sequence by binary search over cu_seqlens_q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import next_pow2, pdl, pdl_enter, tl, triton
from kernels.decode_attention import (
    dot_precision,
    paged_decode_attention,
    paged_decode_attention_ref,
)

BLOCK_M = 64  # query rows (tokens x grouped heads) per program
BLOCK_N = 64  # keys per inner-loop tile (>= 16: the K dim of the P @ V dot)
NUM_WARPS = 4
NUM_STAGES = 2  # KV-loop pipelining depth; 2 beat 3 on H100 for prefill (bench, 2026-11-25)


QUERY_CHUNK = 256  # CPU reference: prefill query rows per SDPA call (bounds the score matrix)

@triton.jit
def _find_seq(cu_seqlens_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    # Largest b with cu_seqlens[b] // BLOCK_Q + b <= pid (that start is monotone in b).
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_ptr + mid) // BLOCK_Q + mid
        if start <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_kv_range(
    acc, l_i, m_i, q, pos, limit,
    k_cache_ptr, v_cache_ptr, bt_row, kvh,
    lo, hi, kv_start, kv_end, scale_log2,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of every tile is visible to every row
    WINDOW: tl.constexpr,  # > 0: row at position p sees keys p - WINDOW < n <= limit
):
    # Online softmax (flash attention) over key tiles [lo, hi). In log2 units: s = q.k * scale * log2 e.
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        # Keys are gathered per token through the block table, so BLOCK_N and the cache's
        # block size are independent. Entries outside [kv_start, kv_end) (past the sequence:
        # -1, junk; before every row's window: maybe freed) are never loaded.
        if MASKED:
            n_ok = (n < kv_end) & (n >= kv_start)
            blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        else:
            n_ok = n >= 0  # all true; only the head_dim padding needs masking
            blk = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)
        off = (n % BLOCK_SIZE).to(tl.int64)
        k_rows = blk * stride_kb + kvh * stride_kh + off * stride_ks
        v_rows = blk * stride_vb + kvh * stride_vh + off * stride_vs
        if MASKED or BLOCK_D != HEAD_DIM:
            kt = tl.load(k_cache_ptr + k_rows[None, :] + d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]
            v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
        else:
            kt = tl.load(k_cache_ptr + k_rows[None, :] + d[:, None])
            v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :])
        s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            visible = (n[None, :] <= limit[:, None]) & n_ok[None, :]  # limit is pos but in an image
            if WINDOW > 0:
                visible = visible & (n[None, :] > pos[:, None] - WINDOW)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if WINDOW > 0:
            # A row may see no key of a tile (its window starts later): keep exp2 off -inf - -inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_seqs"])  # 1 would become a constexpr and break the search
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr, limits_ptr,
    scale_log2,
    num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,  # cache block size; constexpr so // and % become shifts
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,   # GROUP padded to a power of two
    BLOCK_Q: tl.constexpr,   # tokens per tile; BLOCK_Q * BLOCK_G == BLOCK_M
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WINDOW: tl.constexpr,  # 0: full causal attention
    HAS_LIMITS: tl.constexpr, PDL: tl.constexpr,  # causal_limits given (a step with bidirectional image runs)
):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    b = _find_seq(cu_seqlens_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    local = pid - (q_start // BLOCK_Q + b)
    num_tiles = tl.cdiv(q_len, BLOCK_Q)
    if local >= num_tiles:
        return  # one of the spare tiles of the upper-bound grid
    # Heaviest (latest) query tile first, so long causal tiles don't straggle at the end.
    tile = num_tiles - 1 - local
    seq_len = tl.load(seq_lens_ptr + b)
    context = seq_len - q_len  # position of the sequence's first new token

    m = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + m // BLOCK_G
    g = m % BLOCK_G
    row_ok = (tok < q_len) & (g < GROUP)
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    pos = context + tok  # each row's query position; padding rows only see extra keys
    kv_end = context + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)
    if HAS_LIMITS:
        # an image token sees up to its run's end, which lies in this step's tokens: the tile
        # reads keys up to its real rows' largest limit (padding rows keep their position, past
        # the sequence: they must not stretch the range)
        limit = tl.load(limits_ptr + q_rows, mask=row_ok, other=0).to(tl.int32)
        kv_end = tl.maximum(kv_end, tl.max(limit, axis=0) + 1)
        limit = tl.where(row_ok, limit, pos)
    else:
        limit = pos

    # Keys [0, full_end) are visible to every row of the tile (its first token sees up to
    # context + tile * BLOCK_Q): no causal mask there. The causal tiles run after, up to the
    # last real token's position (or limit). Either loop's first tile shows key 0 to every row,
    # so each row's running max is finite from then on.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    if WINDOW > 0:
        # Every tile masked: from the first key of the tile's first row's window to its last key.
        kv_start = tl.maximum(context + tile * BLOCK_Q - WINDOW + 1, 0)
        acc, l_i, m_i = _attend_kv_range(
            acc, l_i, m_i, q, pos, limit, k_cache_ptr, v_cache_ptr, bt_row, kvh,
            kv_start // BLOCK_N * BLOCK_N, kv_end, kv_start, kv_end,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, MASKED=True, WINDOW=WINDOW)
    else:
        full_end = (context + tile * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attend_kv_range(
            acc, l_i, m_i, q, pos, limit, k_cache_ptr, v_cache_ptr, bt_row, kvh, 0, full_end, 0, kv_end,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, MASKED=False, WINDOW=0)
        acc, l_i, m_i = _attend_kv_range(
            acc, l_i, m_i, q, pos, limit, k_cache_ptr, v_cache_ptr, bt_row, kvh, full_end, kv_end, 0, kv_end,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, MASKED=True, WINDOW=0)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a padding row may see no key of its window
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    assert q.dim() == 3, "q must be [T, Hq, D]"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "cache [blocks, Hkv, bs, D]"
    assert q.shape[2] == k_cache.shape[3], "head_dim mismatch"
    assert q.shape[1] % k_cache.shape[1] == 0, "Hq must be a multiple of Hkv"
    num_seqs = seq_lens.shape[0]
    assert cu_seqlens_q.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    causal_limits: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Triton paged causal attention over a mixed batch; returns `[T, Hq, D]` in q's dtype.
    `sliding_window` > 0: each query sees only its last that many keys (itself included).
    `causal_limits` [T]: each query's last visible key position (see the module docstring).
    `block_m`, `block_n`, `num_warps`, `num_stages` override the tile config (kernels/bench_attention.py).

    No host sync: the grid depends only on T, B and Hkv, so it can run under CUDA graphs.
    """
    _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)
    num_tokens, hq, head_dim = q.shape
    hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((num_tokens, hq, head_dim), dtype=q.dtype, device=q.device)
    assert out.shape == (num_tokens, hq, head_dim) and out.stride(-1) == 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = hq // hkv
    block_g = next_pow2(group)
    block_m = max(block_m or BLOCK_M, 16 * block_g)  # at least 16 rows for tl.dot
    block_q = block_m // block_g
    grid = (num_tokens // block_q + num_seqs, hkv)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables,
        causal_limits if causal_limits is not None else cu_seqlens_q,  # never read without limits
        scale * 1.4426950408889634,  # exp(x) = exp2(x * log2 e): exp2 is the fast instruction
        num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(2), v_cache.stride(1),
        block_tables.stride(0), BLOCK_SIZE=block_size,
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_M=block_m,
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)), BLOCK_N=block_n or BLOCK_N,
        DOT_PRECISION=dot_precision(q.dtype), WINDOW=int(sliding_window or 0),
        HAS_LIMITS=causal_limits is not None,
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES, **pdl(q.device)
    )
    return out


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    causal_limits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `paged_attention` (fp32 math), the CPU backend's attention.

    Decode rows (q_len 1) go through one batched SDPA; longer queries loop per sequence.
    """
    _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)
    num_tokens, hq, head_dim = q.shape
    hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if out is None:
        out = torch.empty((num_tokens, hq, head_dim), dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()  # host reads are fine on the CPU backend
    lens = seq_lens.tolist()
    q_lens = [cu[i + 1] - cu[i] for i in range(len(lens))]

    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        idx = torch.tensor(decode, device=q.device)
        rows = cu_seqlens_q[idx].long()
        out[rows] = paged_decode_attention_ref(
            q[rows], k_cache, v_cache, seq_lens[idx], block_tables[idx], scale, sliding_window=sliding_window)

    for b, q_len in enumerate(q_lens):
        if q_len <= 1:
            continue
        seq_len, start = lens[b], cu[b]
        nblk = -(-seq_len // block_size)
        # Blocks before the first query's window are not read (a window layer may have freed them):
        # keys are gathered from block `skip` on, and key j of the gather is position base + j.
        first_key = max(0, seq_len - q_len - sliding_window + 1) if sliding_window else 0
        skip = first_key // block_size
        base = skip * block_size
        blocks = block_tables[b, skip:nblk].long()
        # A head-major gather comes out [Hkv, blocks, bs, D]: each head's keys in order, one copy.
        k = k_cache.transpose(0, 1).index_select(1, blocks).flatten(1, 2)[:, :seq_len - base].float()  # [Hkv, L, D]
        v = v_cache.transpose(0, 1).index_select(1, blocks).flatten(1, 2)[:, :seq_len - base].float()
        # Queries in chunks of QUERY_CHUNK rows: the scores of a long prompt over its whole context
        # never exist at once (a 2048-token prompt on 32 heads would need 1.3 GiB per layer).
        for c0 in range(0, q_len, QUERY_CHUNK):
            n = min(QUERY_CHUNK, q_len - c0)
            # GQA without repeating K/V: the G heads of a KV head stack as G * n query rows.
            qb = q[start + c0:start + c0 + n].float().reshape(n, hkv, group, head_dim)
            qb = qb.permute(1, 2, 0, 3).reshape(hkv, group * n, head_dim)
            first = seq_len - q_len + c0
            query_pos = torch.arange(first, first + n, device=q.device)[:, None]
            limit = query_pos
            if causal_limits is not None:  # image tokens see up to their run's end
                limit = causal_limits[start + c0:start + c0 + n].to(query_pos)[:, None]
            visible = int(limit.max()) + 1  # keys past every query's limit are never attended: leave them out
            key_pos = torch.arange(base, visible, device=q.device)[None, :]
            mask = key_pos <= limit
            if sliding_window:
                mask &= key_pos > query_pos - sliding_window
            o = F.scaled_dot_product_attention(qb, k[:, :visible - base], v[:, :visible - base],
                                               attn_mask=mask.repeat(group, 1), scale=scale)
            o = o.reshape(hkv, group, n, head_dim).permute(2, 0, 1, 3)
            out[start + c0:start + c0 + n] = o.reshape(n, hq, head_dim).to(out.dtype)
    return out


__all__ = [
    "paged_attention",
    "paged_attention_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
]

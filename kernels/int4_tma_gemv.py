"""y = x @ W.T for one row of x with W in int4, each program's whole tile brought at once by the Tensor
Memory Accelerator: the one-row path for int4 weights whose 16-row tiles fit one wave (Llama-3.1-8B's qkv and
o projections at batch 1).

Why: kernels/int4_mma_gemv.py loads codes into registers, two slabs a warp before it computes them, so
a small weight is read in several short round trips of each warp and the kernel waits on them (on gate_up
at one row, 46% of its warps' stall samples on the loads' scoreboard; Nsight Compute, H200). Here a
program of four warps owns 16 weight rows and, before anything else, asks for all of them (16 x K/2 bytes,
K <= 4,096: at most 32 KiB) by `cp.async.bulk.tensor` into shared memory, in chunks of 2,048 columns with
an mbarrier each. With at most three programs an SM (142-146 registers a thread) every byte of a weight of up to
3 x SMs tiles is in flight from the start. The warps then read the chunks back in the MMA GEMV's lane
layout (lane 4g + t: words 4t..4t+3 of each 128-column slab, rows g and g + 8; warp w takes slabs
w, w + 4, ...) and run its PTX (`int4_mma_gemv._asm`), so the arithmetic is that kernel's, bit for bit.

On an H200 (BENCHMARKS.md, session 13, µs a call at one row, weights cycled past L2): qkv 7.1 against
the MMA GEMV's 9.9, o 6.6 against 6.9; through the engine, batch-1 int4 decode 419.6 tok/s against 404.8
with the MMA GEMV on every shape (one call). Where the prototypes lost, the MMA GEMV stays: gate_up (1,792
tiles: programs that wait for their data hold the SM from the next ones; 25.2 against 22.9), down
(K = 14,336 through a ring of chunks: 17.2 against 15.2), and a persistent form streaming across tiles
(a layer's four linears 62.3 against 54.7).

One row only: x's row sits in the B columns of lanes g = 0, the other seven columns are zero and their
outputs are never stored. Hopper and later (TMA), bf16 / fp16, N a multiple of 16, K a multiple of
2,048 up to 4,096, group sizes multiples of 128. No CPU path: the CPU tests run the shared PTX on an
emulated warp (tests/kernels/test_kernel_int4_mma_gemv.py) and build this kernel for sm_90.
"""

from __future__ import annotations

import functools

import torch

from kernels._mma_gemv import HAS_GLUON
from kernels._triton import num_sms, pdl
from kernels.int4_mma_gemv import CONSTRAINTS, SLAB, _asm

try:
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAS_TMA = HAS_GLUON
except Exception:  # pragma: no cover - Tritons without Gluon's Hopper module
    HAS_TMA = False

if HAS_TMA:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from kernels._mma_gemv import fragment, pdl_enter

    # one TMA load into shared memory: `async_load` in newer Tritons, the older name in 3.6 (the GPU image's)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

WARPS = 4
SLABS_A_WARP = 4  # slabs a warp takes from each chunk
CHUNK = WARPS * SLABS_A_WARP * SLAB  # 2,048 columns (1 KiB of codes a row) an mbarrier
MAX_K = 2 * CHUNK  # a program's 16 rows in at most 32 KiB of shared memory
PROGRAMS_AN_SM = 3  # 142-146 registers x 128 threads (sm_90 builds): three programs fill the register file

if HAS_TMA:
    _ASM_BF16 = gl.constexpr(_asm("bf16"))
    _ASM_F16 = gl.constexpr(_asm("f16"))
    _CONSTRAINTS = gl.constexpr(CONSTRAINTS)
    # [16 rows, S slabs, 16 words] as the codes lie in memory: no swizzle, each row's slabs contiguous
    _TILE_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)

    @gluon.jit
    def _int4_tma_gemv_kernel(desc, x_ptr, scale_ptr, y_ptr, stride_sn,
                              GROUP: gl.constexpr, S: gl.constexpr, CHUNKS: gl.constexpr, W: gl.constexpr,
                              ASM: gl.constexpr, PDL: gl.constexpr):
        # [8 g, S slabs, 16 (t, u)]: lane 4g + t of warp w holds words 4t..4t+3 of slabs w, w + W, ...
        L: gl.constexpr = gl.BlockedLayout([1, 1, 4], [8, 1, 4], [1, W, 1], [2, 1, 0])
        n0 = gl.program_id(0) * 16
        tile = gl.allocate_shared_memory(gl.int32, [CHUNKS, 16, S, 16], desc.layout)
        landed = gl.allocate_shared_memory(gl.int64, [CHUNKS, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(CHUNKS):
            mbarrier.init(landed.index(c), count=1)
        fence_async_shared()  # the barriers' initialization, seen by the TMA unit
        pdl_enter(PDL)
        for c in gl.static_range(CHUNKS):  # the whole tile in flight at once
            mbarrier.expect(landed.index(c), 16 * S * 16 * 4)
            _tma_load(desc, [n0, c * S, 0], landed.index(c), tile.index(c))

        g = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]
        s = gl.arange(0, S, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
        j = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
        word = s * 16 + j  # within a chunk
        # x as int64 (four columns each), lanes g = 0 only: the MMA's other B columns stay zero
        x_ptrs = x_ptr.to(gl.pointer_type(gl.int64), bitcast=True) + word * 2
        x_ok = (g == 0) & (word >= 0)  # (word >= 0: the mask in the operands' full shape)
        slo_ptrs = scale_ptr + (n0 + g).to(gl.int64) * stride_sn + j * 0
        shi_ptrs = slo_ptrs + 8 * stride_sn
        acc = gl.zeros([8, S, 16], gl.float32, L)
        for c in gl.static_range(CHUNKS):
            kw = c * S * 16  # the chunk's first word
            x03 = gl.load(x_ptrs + kw * 2, mask=x_ok, other=0)
            x47 = gl.load(x_ptrs + kw * 2 + 1, mask=x_ok, other=0)
            group = (kw * 8 + s * 128) // GROUP  # a slab (128 columns) lies in one group
            s_lo = gl.load(slo_ptrs + group).to(gl.float32)
            s_hi = gl.load(shi_ptrs + group).to(gl.float32)
            mbarrier.wait(landed.index(c), 0)
            lo = tile.index(c).slice(0, 8, dim=0).load(L)
            hi = tile.index(c).slice(8, 8, dim=0).load(L)
            acc = gl.inline_asm_elementwise(ASM, _CONSTRAINTS, [lo, hi, x03, x47, s_lo, s_hi, acc],
                                            dtype=gl.float32, is_pure=True, pack=4)
        for c in gl.static_range(CHUNKS):
            mbarrier.invalidate(landed.index(c))
        out = gl.sum(acc, axis=1)  # the warps' slabs added: [8 g, 16 (t, u)], u = accumulator c_u
        OUT: gl.constexpr = gl.SliceLayout(1, L)
        og = gl.arange(0, 8, layout=gl.SliceLayout(1, OUT))[:, None]
        past_g, m = fragment(gl.arange(0, 16, layout=gl.SliceLayout(0, OUT))[None, :])
        row = n0 + og + past_g
        gl.store(y_ptr + row, out.to(y_ptr.dtype.element_ty), mask=m == 0)  # x's one row


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def shape_fits(n: int, k: int, group: int, sms: int) -> bool:
    """A weight [n, k] of this group size that the kernel takes: whole 16-row tiles that fit one wave of
    PROGRAMS_AN_SM programs on `sms` SMs, K in whole 2,048-column chunks up to MAX_K."""
    return n % 16 == 0 and n // 16 <= PROGRAMS_AN_SM * sms and k % CHUNK == 0 and k <= MAX_K and group % SLAB == 0


def takes(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether int4_linear sends this call here: one row of bf16 / fp16 on a CUDA device with TMA, a weight
    whose shape fits (`shape_fits`), operands TMA and the kernel's loads can address (16-byte aligned
    codes and x)."""
    if not (HAS_TMA and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2 and x.shape[0] == 1):
        return False
    k = x.shape[1]
    return (shape_fits(codes.shape[0], k, k // scale.shape[1], num_sms(x.device, 0))
            and x.stride(1) == 1 and x.data_ptr() % 16 == 0
            and codes.is_contiguous() and codes.data_ptr() % 16 == 0 and scale.stride(1) == 1
            and _has_tma(x.device.index or 0))


def int4_tma_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [1, K] times the int4 weight [N, K] transposed -> [1, N] in x.dtype (see `takes`)."""
    assert takes(x, codes, scale), "int4_tma_gemv: unsupported operands (see takes())"
    k = x.shape[1]
    n = codes.shape[0]
    slabs = CHUNK // SLAB
    # the codes as [N, K / 128 slabs, 16 words]; a box is one chunk of a 16-row tile
    words = codes.view(torch.int32).view(n, k // SLAB, 16)
    desc = TensorDescriptor.from_tensor(words, [16, slabs, 16], _TILE_LAYOUT)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _int4_tma_gemv_kernel[(n // 16,)](
        desc, x, scale, y, scale.stride(0),
        GROUP=k // scale.shape[1], S=slabs, CHUNKS=k // CHUNK, W=WARPS,
        ASM=_ASM_BF16 if x.dtype == torch.bfloat16 else _ASM_F16, num_warps=WARPS, **pdl(x.device))
    return y

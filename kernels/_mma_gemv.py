"""What the MMA GEMVs (kernels/int4_mma_gemv.py, kernels/fp8_mma_gemv.py) share: their lane layout
[T tiles, W warps, 8 g, 16 (t, u)] (lane 4g + t of warp w holds words 4t..4t+3 of a slab for rows g and
g + 8 of each of its T 16-row tiles), the programmatic-dependent-launch prologue, where each
accumulator of mma.sync's C fragment lands, and the capability check."""

from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAS_GLUON = True
except Exception:  # pragma: no cover - Tritons without Gluon, or no Triton
    HAS_GLUON = False


@functools.cache
def has_mma_sync(device_index: int) -> bool:
    """mma.sync.m16n8k16 with bf16: compute capability 8.0 and later."""
    return torch.cuda.get_device_capability(device_index)[0] >= 8


if HAS_GLUON:
    @gluon.jit
    def pdl_enter(PDL: gl.constexpr):
        """As kernels._triton.pdl_enter: wait for the previous kernel, let the next one be scheduled."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)

    @gluon.jit
    def lanes(L: gl.constexpr, T: gl.constexpr, W: gl.constexpr):
        """(tile, warp, g, (t, u)) indices, each broadcastable over L, the kernels' BlockedLayout
        ([T, 1, 1, 4], [1, 1, 8, 4], [1, W, 1, 1], [3, 2, 1, 0])."""
        tile = gl.arange(0, T, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))[:, None, None, None]
        w = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))[None, :, None, None]
        g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))[None, None, :, None]
        tu = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))[None, None, None, :]
        return tile, w, g, tu

    @gluon.jit
    def fragment(tu):
        """For lane slot tu = 4t + u (u = C fragment register c_u) of a lane 4g + t: the weight row past g
        (c0, c1: + 0; c2, c3: + 8) and the x row (c0, c2: 2t; c1, c3: 2t + 1) of its accumulator."""
        return 8 * ((tu % 4) // 2), 2 * (tu // 4) + tu % 2

    @gluon.jit
    def outputs(n0, L: gl.constexpr, T: gl.constexpr):
        """For the warps' summed accumulators [T, 8 g, 16 (t, u)] (layout SliceLayout(1, L)): the weight
        row and x row of each (`fragment`)."""
        OUT: gl.constexpr = gl.SliceLayout(1, L)
        ot = gl.arange(0, T, layout=gl.SliceLayout(1, gl.SliceLayout(2, OUT)))[:, None, None]
        og = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, OUT)))[None, :, None]
        ou = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, OUT)))[None, None, :]
        past_g, m = fragment(ou)
        return n0 + 16 * ot + og + past_g, m

"""A warp of 32 lanes in numpy that runs the inline PTX of the MMA GEMVs (kernels/int4_mma_gemv.py,
kernels/fp8_mma_gemv.py) on CPU: the interpreter runs no PTX, so their tests run it here, with
operands placed as the kernels load them. Knows only the instructions those kernels use, with the
semantics and mma.sync's fragment layout as the PTX ISA gives them (lane = 4 * group + thread in
group); anything else fails loudly."""

from __future__ import annotations

import re

import numpy as np
import torch


class Warp:
    """Registers are uint32 [32] (the int64 operands uint64); operands $n number from $4 (four outputs)."""

    def __init__(self, dtype: str, inputs: list):
        self.half = dtype  # "bf16" or "f16"
        self.regs = {f"${4 + i}": v for i, v in enumerate(inputs)}

    def _halves(self, r: np.ndarray) -> np.ndarray:  # uint32 [32] -> float32 [32, 2] (low, high)
        h = np.stack([r & 0xFFFF, r >> 16], -1).astype(np.uint32)
        if self.half == "bf16":
            return (h << 16).view(np.float32)  # bf16 subnormals become float32 subnormals: exact
        return h.astype(np.uint16).view(np.float16).astype(np.float32)

    def _pack(self, f: np.ndarray) -> np.ndarray:  # float32 [32, 2] -> uint32 [32], rounded to nearest even
        t = torch.from_numpy(np.ascontiguousarray(f))
        bits = t.to(torch.bfloat16 if self.half == "bf16" else torch.float16).view(torch.int16).numpy()
        h = bits.astype(np.uint32) & 0xFFFF
        return h[:, 0] | (h[:, 1] << 16)

    def _val(self, tok: str) -> np.ndarray:
        if tok.startswith("0f"):
            return np.full(32, int(tok[2:], 16), np.uint32)
        return self.regs[tok] if tok in self.regs else np.full(32, int(tok, 0), np.uint32)

    def run(self, asm: str) -> None:
        for line in asm.splitlines():
            line = line.strip().rstrip(";")
            if not line or line in "{}" or line.startswith(".reg"):
                continue
            op, rest = line.split(None, 1)
            if op == "mov.b64":  # {lo, hi}, $n: a 64-bit operand split into its halves
                lo, hi, src = re.match(r"\{(\w+), (\w+)\}, (\$\d+)", rest).groups()
                self.regs[lo], self.regs[hi] = (self.regs[src] & 0xFFFFFFFF).astype(np.uint32), \
                    (self.regs[src] >> 32).astype(np.uint32)
                continue
            if op.startswith("mma.sync"):
                d, a, b, c = (re.findall(r"[\w$]+", grp) for grp in re.findall(r"\{([^}]*)\}", rest))
                self._mma(d, a, b, c)
                continue
            dst, *src = [t.strip() for t in rest.split(",")]
            v = [self._val(t) for t in src]
            if op in ("mov.b32", "mov.f32"):
                out = v[0]
            elif op == "lop3.b32":
                assert src[3] == "0xea"  # (a & b) | c
                out = (v[0] & v[1]) | v[2]
            elif op == "and.b32":
                out = v[0] & v[1]
            elif op == "shr.u32":
                out = v[0] >> v[1]
            elif op == "shl.b32":
                out = (v[0].astype(np.uint64) << v[1].astype(np.uint64)) & 0xFFFFFFFF
            elif op == "prmt.b32":
                # default mode: result byte i is byte (sel_i & 7) of {b, a}, or, where sel_i & 8, that
                # byte's sign bit copied over all eight bits
                both = v[0].astype(np.uint64) | (v[1].astype(np.uint64) << 32)
                out = np.zeros(32, np.uint32)
                for i in range(4):
                    sel = (int(src[2], 0) >> (4 * i)) & 0xF
                    byte = ((both >> (8 * (sel & 7))) & 0xFF).astype(np.uint32)
                    if sel & 8:
                        byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
                    out |= byte << (8 * i)
            elif op.startswith("fma.rn.") and op.endswith("x2"):
                out = self._pack(self._halves(v[0]) * self._halves(v[1]) + self._halves(v[2]))
            elif op == "fma.rn.f32":
                f = [x.view(np.float32) for x in v]
                out = (f[0] * f[1] + f[2]).astype(np.float32).view(np.uint32)
            else:
                raise AssertionError(f"the emulator does not know {op}")
            self.regs[dst] = out.astype(np.uint32)

    def _mma(self, d: list, a: list, b: list, c: list) -> None:
        lane = np.arange(32)
        g, t = lane // 4, lane % 4
        A, B = np.zeros((16, 16), np.float32), np.zeros((16, 8), np.float32)
        for i, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
            h = self._halves(self.regs[a[i]])
            A[row, col], A[row, col + 1] = h[:, 0], h[:, 1]
        for i, k in enumerate((2 * t, 2 * t + 8)):
            h = self._halves(self.regs[b[i]])
            B[k, g], B[k + 1, g] = h[:, 0], h[:, 1]
        D = A.astype(np.float64) @ B.astype(np.float64)
        for i, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
            acc = self.regs[c[i]].view(np.float32) + D[row, col]
            self.regs[d[i]] = acc.astype(np.float32).view(np.uint32)

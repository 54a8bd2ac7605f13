"""What a Triton kernel compiles to on Hopper, without a GPU: registers, spills and the instructions
of its hottest loop, from the sm_90 build that Triton's own ptxas makes on this machine.

    python -m kernels.sass      # the one-row GEMVs at their default tiles: loop instructions a weight

Why: a one-row quantized GEMV is bound by instruction issue before bandwidth. An H200 SM issues 128
thread-instructions a clock while the copy rate brings it about 18 bytes, so an int4 GEMV keeps up
only below 3.6 instructions a code (BENCHMARKS.md, session 8: the byte-unpacking kernel took 8.0 and
ran at 22-36% of the copy rate; the word kernel takes 4.4, the MMA GEMV of kernels/int4_mma_gemv.py
2.5-2.6). Counting ranks unpack schemes before any device time is spent; only the card says how fast
they are (the MMA GEMV, under the budget, runs at half the copy rate: latency, not issue, bounds it).

The build is specialized as a launch would be: pointer and integer arguments are taken as
multiples of 16 unless named in `unspecialized` (a kernel's `do_not_specialize`). Without that hint
nothing is vectorized or pipelined and the counts mean nothing. Counts come from the installed
Triton, which may differ from the GPU machines' by a few percent.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from kernels._triton import HAS_TRITON, triton

HOPPER = 90


@dataclass
class Build:
    registers: int  # a thread's
    stack_bytes: int  # a thread's local memory: spilled registers
    loop_instructions: int  # in the body of the kernel's largest loop
    opcodes: Counter  # that body's, by opcode (FFMA, LOP3, ...)
    kernel_opcodes: Counter  # the whole kernel's (a kernel without a K loop: kernels/int4_tma_gemv.py)


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def available() -> bool:
    """Whether this Triton ships the CUDA backend's ptxas, cuobjdump and nvdisasm."""
    return HAS_TRITON and all(os.path.exists(_tool(t)) for t in ("ptxas", "cuobjdump", "nvdisasm"))


def _run(tool: str, cubin: bytes, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *args, f.name], capture_output=True, text=True, check=True).stdout


def _instructions(sass: str) -> Tuple[List[Tuple[str, str]], Dict[str, int]]:
    """(opcode, operands) of every instruction, and the index each label points at."""
    labels: Dict[str, int] = {}
    ops: List[Tuple[str, str]] = []
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)\S*\s*(.*)", line)
        if ins:
            ops.append((ins.group(1), ins.group(2)))
    return ops, labels


def _largest_loop(ops: List[Tuple[str, str]], labels: Dict[str, int]) -> Counter:
    """Opcodes between a label and the furthest backward branch to it: the largest loop body."""
    body = (0, 0)
    for end, (op, rest) in enumerate(ops):
        target = re.search(r"(L_x_\d+)", rest) if op == "BRA" else None
        start = labels.get(target.group(1), end + 1) if target else end + 1
        if start <= end and end - start > body[1] - body[0]:
            body = (start, end)
    return Counter(op for op, _ in ops[body[0]:body[1]])


def build(fn: Any, signature: Dict[str, str], constexprs: Dict[str, Any], num_warps: int = 4,
          num_stages: int = 3, unspecialized: Tuple[str, ...] = ()) -> Build:
    """Compile `fn` (a @triton.jit or @gluon.jit kernel) for sm_90. `signature` maps every non-constexpr
    argument to its Triton type ("*bf16", "i32", ...); `constexprs` gives the rest their values."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels decorated for the interpreter do not compile
        raise RuntimeError("kernels.sass builds need a process without TRITON_INTERPRET=1")
    names = fn.arg_names  # the kernel's own order
    assert set(names) == set(signature) | set(constexprs), f"arguments of {fn.__name__}: {names}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in signature and n not in unspecialized}
    full = {n: signature.get(n, "constexpr") for n in names}
    source_class = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (kernels/int4_mma_gemv.py)
        from triton.experimental.gluon._runtime import GluonASTSource as source_class
    source = source_class(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", HOPPER, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = kernel.asm["cubin"]
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", _run("cuobjdump", cubin, "--dump-resource-usage"))
    assert usage, "cuobjdump printed no resource usage"
    ops, labels = _instructions(_run("nvdisasm", cubin, "-c"))
    loop = _largest_loop(ops, labels)
    return Build(int(usage.group(1)), int(usage.group(2)), sum(loop.values()), loop, Counter(op for op, _ in ops))


def int4_gemv() -> Tuple[Build, int]:
    """The int4 GEMV (group 128) at its default tile, and the codes a thread takes per loop step."""
    from kernels import quant_gemv as qg

    b = build(qg._int4_gemv_kernel,
              {"x_ptr": "*bf16", "words_ptr": "*i32", "scale_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "MASK": "i32", "ONE": "i32"},
              {"GROUP": 128, "ROWS": 1, "ROWS_P2": 1, "BLOCK_N": qg.INT4_BLOCK_N, "SUBS": qg.INT4_BLOCK_K // 128,
               "SPAN_W": 16, "PDL": True}, num_warps=qg.NUM_WARPS)
    return b, qg.INT4_BLOCK_N * qg.INT4_BLOCK_K // (32 * qg.NUM_WARPS)


def int4_mma_gemv() -> Tuple[Build, int]:
    """The int4 MMA GEMV (group 128, one row, 8 warps), and the codes a thread takes per loop step."""
    from kernels import int4_mma_gemv as mg

    b = build(mg._int4_mma_gemv_kernel,
              {"x_ptr": "*bf16", "words_ptr": "*i32", "scale_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
               "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_ym": "i32"},
              {"GROUP": 128, "T": 1, "W": 8, "UNROLL": mg.UNROLL, "ASM": mg._ASM_BF16.value, "PDL": True}, num_warps=8,
              unspecialized=("M",))
    return b, mg.UNROLL * 2 * 4 * 8  # slabs x rows g, g + 8 x words x codes


def int4_tma_gemv() -> Tuple[Build, int]:
    """The TMA-fed int4 GEMV (group 128, K = 4,096), and the codes a thread takes in the whole kernel."""
    from kernels import int4_tma_gemv as tg

    slabs = tg.CHUNK // 128
    layout = repr(tg._TILE_LAYOUT)
    b = build(tg._int4_tma_gemv_kernel,
              {"desc": f"tensordesc<i32[16, {slabs}, 16],{layout}>", "x_ptr": "*bf16", "scale_ptr": "*bf16",
               "y_ptr": "*bf16", "stride_sn": "i32"},
              {"GROUP": 128, "S": slabs, "CHUNKS": tg.MAX_K // tg.CHUNK, "W": tg.WARPS, "ASM": tg._ASM_BF16.value,
               "PDL": True}, num_warps=tg.WARPS, unspecialized=("desc",))
    return b, tg.MAX_K * 16 // (32 * tg.WARPS)  # 16 rows x K codes over the program's threads


def fp8_mma_gemv() -> Tuple[Build, int]:
    """The fp8 MMA GEMV (one row, 8 warps), and the codes a thread takes per loop step."""
    from kernels import fp8_mma_gemv as fmg

    b = build(fmg._fp8_mma_gemv_kernel,
              {"x_ptr": "*bf16", "words_ptr": "*i32", "scale_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "N": "i32",
               "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"},
              {"T": 1, "W": 8, "UNROLL": fmg.UNROLL, "ASM": fmg._ASM_BF16.value}, num_warps=8,
              unspecialized=("M",))
    return b, fmg.UNROLL * 2 * 4 * 4  # slabs x rows g, g + 8 x words x codes


def fp8_gemv() -> Tuple[Build, int]:
    """The fp8 GEMV at its default tile, and the codes a thread takes per loop step."""
    from kernels import quant_gemv as qg

    b = build(qg._rowscaled_gemv_kernel,
              {"x_ptr": "*bf16", "codes_ptr": "*u8", "scale_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_cn": "i32"},
              {"IS_FP8": True, "ROWS": 1, "ROWS_P2": 1, "BLOCK_N": qg.ROWSCALED_BLOCK_N,
               "BLOCK_K": qg.ROWSCALED_BLOCK_K, "PDL": True}, num_warps=qg.NUM_WARPS)
    return b, qg.ROWSCALED_BLOCK_N * qg.ROWSCALED_BLOCK_K // (32 * qg.NUM_WARPS)


def bf16_gemv() -> Tuple[Build, int]:
    """The bf16 GEMV at its default tile, and the weights a thread takes per loop step."""
    from kernels import gemv

    block_k = gemv.BLOCK_K_BYTES // 2
    b = build(gemv._gemv_kernel,
              {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_wn": "i32"},
              {"ROWS": 1, "ROWS_P2": 1, "HAS_BIAS": False, "BLOCK_N": gemv.BLOCK_N, "BLOCK_K": block_k, "PDL": True},
              num_warps=gemv.NUM_WARPS)
    return b, gemv.BLOCK_N * block_k // (32 * gemv.NUM_WARPS)


def main() -> None:
    assert available(), "needs Triton's CUDA backend tools (ptxas, cuobjdump, nvdisasm)"
    print(f"sm_{HOPPER} builds, triton {triton.__version__}; loop instructions a weight (per thread)")
    for name, make in (("int4 (group 128)", int4_gemv), ("int4 MMA GEMV", int4_mma_gemv), ("fp8", fp8_gemv),
                       ("fp8 MMA GEMV", fp8_mma_gemv), ("int4 TMA GEMV*", int4_tma_gemv),
                       ("bf16", bf16_gemv)):
        b, weights = make()
        ops = b.kernel_opcodes if make is int4_tma_gemv else b.opcodes  # no K loop there: the whole kernel
        top = ", ".join(f"{op} {n / weights:.2f}" for op, n in ops.most_common(6))
        print(f"{name:<17} {sum(ops.values()) / weights:5.2f} a weight ({top}); "
              f"{b.registers} registers, {b.stack_bytes} bytes of stack")
    print("* the whole kernel at K = 4,096 (unrolled, no K loop)")


if __name__ == "__main__":
    main()

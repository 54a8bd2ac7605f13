"""kernels.sass: the one-row int4 and fp8 GEMVs' loops, built for sm_90 off the card, stay at few
instructions a code (one-row int4 is bound by instruction issue: BENCHMARKS.md, session 8).
The builds run in a process of their own: this one has Triton's interpreter on."""

import json
import os
import subprocess
import sys

import pytest

from kernels import sass

pytestmark = pytest.mark.skipif(not sass.available(), reason="needs Triton's CUDA backend tools")

_PROBE = """
import json
from kernels import sass
out = {}
for name in ("int4_gemv", "int4_mma_gemv", "fp8_mma_gemv", "int4_tma_gemv"):
    build, codes = getattr(sass, name)()
    whole = build.kernel_opcodes
    out[name] = {"codes": codes, "loop": build.loop_instructions, "stack": build.stack_bytes,
                 "registers": build.registers, "ffma": build.opcodes["FFMA"], "hmma": build.opcodes["HMMA"],
                 "top": build.opcodes.most_common(8), "kernel": {op: whole[op] for op in ("HMMA", "FFMA", "UTMALDG")},
                 "kernel_instructions": sum(whole.values())}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_int4_gemv_loop_takes_under_six_instructions_a_code(builds):
    got = builds["int4_gemv"]
    # the loop found is the K step: one FMA a code, no more, no fewer
    assert 0.9 <= got["ffma"] / got["codes"] <= 1.2, got["top"]
    # unpacking bytes took 8.0 a code; the word kernel 4.2-4.4 (triton 3.6-3.9)
    assert got["loop"] / got["codes"] < 6.0, got["top"]
    assert got["stack"] == 0  # no register spills


def test_int4_mma_gemv_loop_takes_under_three_instructions_a_code(builds):
    got = builds["int4_mma_gemv"]
    # the loop found is the K step: a slab's 8 MMAs for each 64 codes of a thread, the products on tensor cores
    assert got["hmma"] * 8 == got["codes"] and got["ffma"] * 16 == got["codes"], got["top"]
    assert got["loop"] / got["codes"] < 3.0, got["top"]  # 2.5-2.6 (triton 3.6-3.9); the FMA-pipe GEMV 4.2-4.4
    assert got["stack"] == 0


def test_fp8_mma_gemv_loop_takes_under_three_and_a_half_instructions_a_code(builds):
    got = builds["fp8_mma_gemv"]
    # the K step: a slab's 4 MMAs for each 32 codes of a thread, no FMA-pipe products
    assert got["hmma"] * 8 == got["codes"] and got["ffma"] == 0, got["top"]
    assert got["loop"] / got["codes"] < 3.5, got["top"]  # 2.97 (triton 3.6): 4 for 2 codes + loads, addresses
    assert got["stack"] == 0


def test_int4_tma_gemv_brings_each_chunk_by_one_tma_load(builds):
    got = builds["int4_tma_gemv"]
    # a thread's share of a 16-row tile at K = 4,096: 8 MMAs a slab, one scale FMA an accumulator a slab,
    # one TMA load a 2,048-column chunk (two), no other products
    assert got["kernel"] == {"HMMA": got["codes"] // 8, "FFMA": got["codes"] // 16, "UTMALDG": 2}, got["kernel"]
    assert got["kernel_instructions"] / got["codes"] < 3.0  # 2.67 (triton 3.6 and 3.9), unrolled: no K loop
    # three programs of 128 threads an SM (kernels.int4_tma_gemv.PROGRAMS_AN_SM): at most 168 registers
    assert got["registers"] <= 168 and got["stack"] == 0

"""kernels.sass: the one-row int4 GEMV's loop, built for sm_90 off the card, stays at few
instructions a code (one-row int4 is bound by instruction issue: BENCHMARKS.md, session 8).
The build runs in a process of its own: this one has Triton's interpreter on."""

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
build, codes = sass.int4_gemv()
print(json.dumps({"codes": codes, "loop": build.loop_instructions, "stack": build.stack_bytes,
                  "ffma": build.opcodes["FFMA"], "top": build.opcodes.most_common(8)}))
"""


def test_int4_gemv_loop_takes_under_six_instructions_a_code():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # the loop found is the K step: one FMA a code, no more, no fewer
    assert 0.9 <= got["ffma"] / got["codes"] <= 1.2, got["top"]
    # unpacking bytes took 8.0 a code; the word kernel 4.2-4.4 (triton 3.6-3.9)
    assert got["loop"] / got["codes"] < 6.0, got["top"]
    assert got["stack"] == 0  # no register spills

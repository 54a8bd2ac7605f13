# quick GPU smoke check of the new kernels against their references (not committed)
import torch
from framework.layers.quantization.int4 import quantize_int4, dequantize_int4
from framework.layers.quantization.int8 import quantize_int8
from kernels.quant_gemv import int4_gemv
from kernels.quant_matmul import quant_matmul, dequantize_int4 as tdeq
from kernels.int8_linear import int8_linear, int8_linear_ref
torch.manual_seed(0)
for n, k in [(6144, 4096), (4096, 14336), (128, 384)]:
    w = torch.randn(n, k, device="cuda") * 0.02
    codes, scale = quantize_int4(w, 128, torch.bfloat16)
    wd = dequantize_int4(codes, scale, torch.float32)
    assert torch.equal(tdeq(codes, scale, torch.bfloat16), wd.to(torch.bfloat16)), "dequantize"
    for m in (1, 2, 4, 16, 64):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        ref = x.float() @ wd.T
        for name, fn in (("gemv", int4_gemv), ("qmm", quant_matmul)):
            if name == "gemv" and m > 8:
                continue
            y = fn(x, codes, scale).float()
            print(n, k, m, name, f"{((y - ref).norm() / ref.norm()).item():.2e}")
    c8, s8 = quantize_int8(w)
    x = torch.randn(300, k, device="cuda").to(torch.bfloat16)
    y, r = int8_linear(x, c8, s8).float(), int8_linear_ref(x, c8, s8).float()
    print(n, k, "int8 w8a8", f"{((y - r).norm() / r.norm()).item():.2e}")

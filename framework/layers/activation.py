import torch
from torch import nn

import kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up over the merged gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)

"""Pieces the vision towers share: their activations by HF name, and the two-layer MLP
(`fc1`, activation, `fc2`, the checkpoints' names) of SigLIP and InternViT."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.errors import UserError

ACTIVATIONS: dict = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a config names under `key`, or a one-line error listing the supported ones."""
    if name not in ACTIVATIONS:
        raise UserError(f"{key}={name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class VisionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, key: str = "vision_config.hidden_act"):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.act = activation(act, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

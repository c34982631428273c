"""Small models for the bad-input catalogue (factories named by import path in configs)."""

from __future__ import annotations

import torch
from torch import nn

from edgeq.demo import DigitsNet


class _EinsumHead(DigitsNet):
    """The demo CNN whose head is an einsum: ONNX has Einsum only from opset 12."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.blocks(self.stem(x))), 1)
        return torch.einsum("bc,nc->bn", x, self.head.weight) + self.head.bias


def einsum_digits(width: int = 16, num_classes: int = 10, hidden: int = 0) -> nn.Module:
    return _EinsumHead(width=width, num_classes=num_classes, hidden=hidden)

"""Small models with planted export faults, importable by config import paths in tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.demo import DigitsNet


class TensorIf(DigitsNet):
    """Python `if` on a tensor value: export cannot capture it."""

    def forward(self, x):
        y = super().forward(x)
        if y.sum() > 0:
            return y * 2
        return y


class CondNet(DigitsNet):
    """The same branch written with torch.cond: exports as an ONNX If node."""

    def forward(self, x):
        y = super().forward(x)
        return torch.cond(y.sum() > 0, lambda t: t * 2, lambda t: t - 1, (y,))


class NoSymbolic(DigitsNet):
    """Uses an op (Airy function) with no ONNX translation."""

    def forward(self, x):
        return torch.special.airy_ai(super().forward(x))


class BakedBatch(DigitsNet):
    """Reads the batch size as a Python int: tracing bakes it into the graph."""

    def forward(self, x):
        n = int(x.shape[0])
        feats = self.pool(self.blocks(self.stem(x))).reshape(n, -1)
        return self.head(feats)


class LiteralBatch(DigitsNet):
    """Reshapes with a literal batch size of 2."""

    def forward(self, x):
        return self.head(self.pool(self.blocks(self.stem(x))).reshape(2, -1))


def literal_batch(**kw):
    return LiteralBatch(**kw)


def tensor_if(**kw):
    return TensorIf(**kw)


def cond_net(**kw):
    return CondNet(**kw)


def no_symbolic(**kw):
    return NoSymbolic(**kw)


def baked_batch(**kw):
    return BakedBatch(**kw)


def three_channel_digits(path: str):
    """Test split with 3 channels, for a model that takes 1."""
    with np.load(path) as z:
        return np.repeat(z["x"], 3, axis=1), z["y"]


class OutlierNet(DigitsNet):
    """The demo network with one pooled feature scaled up 64x and the head scaled down to match.

    In FP32 it computes exactly what DigitsNet computes; INT8 with per-tensor activation ranges (what
    ONNX Runtime and OpenVINO quantize activations with) loses the other 63 features' resolution at the
    head's input: a model that post-training quantization cannot serve within a tight SLA.
    """

    def __init__(self, width: int = 16, num_classes: int = 10, outlier: float = 64.0):
        super().__init__(width=width, num_classes=num_classes)
        s = torch.ones(4 * width)
        s[0] = outlier
        self.register_buffer("outlier_scale", s, persistent=False)

    def forward(self, x):
        feats = torch.flatten(self.pool(self.blocks(self.stem(x))), 1) * self.outlier_scale
        return nn.functional.linear(feats, self.head.weight / self.outlier_scale, self.head.bias)


def outlier_net(**kw):
    return OutlierNet(**kw)


class ScaledLogits(DigitsNet):
    """The demo network with its logits multiplied by `scale`: the same function at a larger scale, so PyTorch's and
    ONNX Runtime's float rounding differences grow by `scale` too."""

    def __init__(self, scale: float = 1000.0, **kw):
        super().__init__(**kw)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


def scaled_logits(**kw):
    return ScaledLogits(**kw)


class NanAux(DigitsNet):
    """The demo network with a second output, 'aux', that is NaN for every sample (the square root of a negative
    number), in PyTorch and in ONNX alike: only a comparison that refuses non-finite values notices it."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, torch.sqrt(-1.0 - logits.abs().sum(1, keepdim=True))


def nan_aux(**kw):
    return NanAux(**kw)

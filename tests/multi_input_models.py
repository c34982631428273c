"""Small models and data with named multi-input / multi-output signatures, shared by the tests of every stage.

- `TinyEncoder`: `input_ids` + `attention_mask` (int64, [batch, seq]) -> `embedding` [batch, 8]: a token embedding
  (its module is named `embedding`, so an output of that name meets an internal value of that name), one masked
  self-attention layer, masked mean pooling. Random weights from a seed: the tests are about plumbing and gates,
  the text demo is the trained one.
- `TwoHeads`: one float image input [batch, 1, 8, 8] -> `boxes` [batch, 4] and `scores` [batch, 10].
- `write_token_splits(folder)`: train/validation/test .npz files with one array per input name and `y`, distinct
  padded token sequences of varying length, and a capture pool (.npz + metadata.csv) for the calibration flow.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

VOCAB = 64
SEQ = 12


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 16, out: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        h = self.embedding(input_ids)
        scores = torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * self.scale
        scores = scores + (1.0 - mask)[:, None, :] * -1e4
        h = self.norm(h + torch.matmul(torch.softmax(scores, dim=-1), self.v(h)))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.proj(pooled)


def tiny_encoder(**kw) -> TinyEncoder:
    return TinyEncoder(**kw)


class TwoHeads(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.box = nn.Linear(32, 4)
        self.cls = nn.Linear(32, 10)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk(image)
        return self.box(f), self.cls(f)


def two_heads(**kw) -> TwoHeads:
    return TwoHeads(**kw)


def save_weights(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def token_samples(n: int, seed: int, seq: int = SEQ, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """n distinct padded sequences: ids in [3, vocab), length 3..seq, 0-padded, mask 1 on real tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, seq), dtype=np.int64)
    mask = np.zeros((n, seq), dtype=np.int64)
    seen: set[bytes] = set()
    i = 0
    while i < n:
        length = int(rng.integers(3, seq + 1))
        row = np.zeros(seq, dtype=np.int64)
        row[:length] = rng.integers(3, vocab, length)
        if row.tobytes() in seen:
            continue
        seen.add(row.tobytes())
        ids[i], mask[i, :length] = row, 1
        i += 1
    return {"input_ids": ids, "attention_mask": mask}


def write_token_splits(folder: Path, sizes: dict[str, int] | None = None, seq: int = SEQ) -> dict[str, Path]:
    """Disjoint train/validation/test splits (.npz: input_ids, attention_mask, y) and a capture pool
    (captures/captures.npz + captures/metadata.csv with capture_id, index, source, length). Returns the paths."""
    sizes = sizes or {"train": 120, "validation": 60, "test": 60, "pool": 80}
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(sizes.values())
    allx = token_samples(total, seed=7, seq=seq)
    out, start = {}, 0
    for name, n in sizes.items():
        part = {k: v[start:start + n] for k, v in allx.items()}
        start += n
        if name == "pool":
            cap = folder / "captures"
            cap.mkdir(exist_ok=True)
            np.savez(cap / "captures.npz", **part)
            lengths = part["attention_mask"].sum(1)
            pd.DataFrame({"capture_id": [f"c{i:04d}" for i in range(n)], "index": np.arange(n),
                          "source": [f"s{i % 3}" for i in range(n)],
                          "length": np.where(lengths > seq // 2, "long", "short")}).to_csv(cap / "metadata.csv",
                                                                                           index=False)
            out["captures"], out["metadata"] = cap / "captures.npz", cap / "metadata.csv"
        else:
            y = (part["input_ids"][:, 0] % 4).astype(np.int64)
            np.savez(folder / f"{name}.npz", **part, y=y)
            out[name] = folder / f"{name}.npz"
    return out


TOKEN_INPUTS = [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"},
                {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64"}]


def token_config(folder: Path, weights: Path, paths: dict[str, Path], **overrides) -> dict:
    """A config dict for TinyEncoder over `write_token_splits` data (cosine metric, ONNX Runtime + OpenVINO)."""
    cfg = {
        "name": "tiny-encoder-test",
        "store": str(folder / "store"),
        "model": {"name": "tiny-encoder", "factory": "tests.multi_input_models:tiny_encoder",
                  "weights": str(weights), "inputs": TOKEN_INPUTS, "outputs": ["embedding"],
                  "example_dims": {"batch": 2, "seq": SEQ}, "metric": "cosine"},
        "targets": [{"name": "ort-cpu", "backend": "onnxruntime"}, {"name": "openvino-cpu", "backend": "openvino"}],
        "data": {"train": {"kind": "arrays", "path": str(paths["train"])},
                 "validation": {"kind": "arrays", "path": str(paths["validation"])},
                 "test": {"kind": "arrays", "path": str(paths["test"])}},
        # the speed gate off: a 0.1 ms encoder's INT8 speed depends on the CPU; the gate has its own tests
        "thresholds": {"parity_samples": 16, "int8_min_speedup": 0},
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


class NormalizedEncoder(TinyEncoder):
    """TinyEncoder with an L2-normalised output: a float head after the last quantized tensor, so the INT8 graph
    gives no output quantization step for `embedding`."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(super().forward(input_ids, attention_mask), dim=-1)


def normalized_encoder(**kw) -> NormalizedEncoder:
    return NormalizedEncoder(**kw)

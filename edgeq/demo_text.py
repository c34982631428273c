"""The second embedded demo: a small transformer sentence encoder on real text that ships with Python.

`ensure_text_demo(root)` builds, once and deterministically:
  - sentences: the first paragraph of the docstring of each public function, class and method (and of the module
    itself) of a FIXED, sorted list of standard-library modules, whitespace normalised, 4..32 words. Each module
    belongs to one of twelve groups (text, files, numbers, network, ...): a sentence's label is its module's group.
    A sentence found in two groups is dropped; so is a sentence whose word sequence another one already has.
    Docstrings change between Python patch versions, so the sizes below are what CPython 3.11 gives; the stamp
    records a content hash of the sentences and the Python version that produced them;
  - a hand-written tokenizer (lower-case ``[a-z0-9]+`` words; ids 0=[PAD], 1=[UNK], 2=[CLS], then the 3,000 most
    frequent words of the TRAINING split) and ``vocab.json``;
  - four splits, disjoint by sentence text and by token ids: train (1,600), validation (200), test (300) and a
    production-capture pool (600), each as ``input_ids`` and ``attention_mask`` (int64 [N, 32]: [CLS], the first
    31 word ids, then padding; the mask is 1 on [CLS] and word ids, 0 on padding) plus the label ``y`` (int64) in
    ``train.npz``, ``validation.npz`` and ``test.npz``; ``texts.csv`` keeps every sentence with its split and row;
  - the pool as ``captures/captures.npz`` (``input_ids``, ``attention_mask``, no labels) plus
    ``captures/metadata.csv`` (``capture_id``, ``index`` = row in the npz, ``source`` = module group, ``length`` =
    short/medium/long by real tokens, ``augmented``, ``simulated_origin``). To exercise the calibration flow's
    filters the pool also holds planted faults after its 600 real rows: exact duplicates of pool rows, copies of
    training sentences (leakage), copies of test sentences (leakage into the held-out split) and rows flagged
    ``augmented=true`` (a pool sentence with one word deleted);
  - `TextEncoder`: token + learned position embeddings, two pre-LayerNorm transformer layers written with plain
    ops (d_model 64, 4 heads, GELU MLP), masked mean pooling, L2-normalised: ``forward(input_ids, attention_mask)``
    returns one [batch, 64] tensor (the config calls it ``embedding``). Both int64 inputs have dynamic ``batch``
    and ``seq`` axes and it exports with either ONNX exporter. It is trained in seconds with a classification
    head over the module groups (the head is not part of the exported model) and saved as safetensors.
A stamp file records the content hashes; a second call finds it and does nothing.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeq.core.store import build_once

TEXT_DEMO_VERSION = "1"
_STAMP = "demo.json"
MAX_LEN = 32
VOCAB_WORDS = 3000
PAD, UNK, CLS = 0, 1, 2
SPECIALS = ["[PAD]", "[UNK]", "[CLS]"]
SPLITS = {"train": 1600, "validation": 200, "test": 300, "pool": 600}
MIN_POOL = 512
# real tokens, [CLS] included: short <= 8 < medium <= 11 < long (about thirds of the pool)
LENGTH_BUCKETS = (8, 11)
# Planted pool faults (rows appended after the real pool rows), as in the digits demo.
FAULTS = {"duplicate": 8, "train-copy": 12, "test-copy": 8, "augmented": 6}
TRAIN_THREADS = 1  # measured: 2 threads on a busy 2-core CPU ran 40x slower per step

# The module groups, in label order. Every list is fixed and sorted; a module that does not import is skipped
# (and named in the stamp).
GROUPS: dict[str, list[str]] = {
    "text": ["codecs", "difflib", "gettext", "html", "html.parser", "locale", "re", "string", "stringprep",
             "textwrap", "unicodedata"],
    "files": ["filecmp", "fileinput", "fnmatch", "glob", "io", "os", "os.path", "pathlib", "shutil", "stat",
              "tempfile"],
    "numbers": ["cmath", "decimal", "fractions", "math", "numbers", "random", "statistics"],
    "network": ["ftplib", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "ipaddress",
                "poplib", "smtplib", "socket", "socketserver", "ssl", "urllib.parse", "urllib.request",
                "xmlrpc.client", "xmlrpc.server"],
    "concurrency": ["asyncio", "concurrent.futures", "multiprocessing", "queue", "sched", "selectors", "subprocess",
                    "threading"],
    "formats": ["base64", "binascii", "configparser", "csv", "json", "pickle", "plistlib", "struct", "tomllib",
                "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax"],
    "archives": ["bz2", "gzip", "lzma", "tarfile", "zipfile", "zipimport", "zlib"],
    "time": ["calendar", "datetime", "time", "zoneinfo"],
    "structures": ["array", "bisect", "collections", "collections.abc", "copy", "dataclasses", "enum", "functools",
                   "heapq", "itertools", "operator", "weakref"],
    "devtools": ["ast", "cProfile", "dis", "doctest", "inspect", "pdb", "pstats", "timeit", "tokenize", "trace",
                 "traceback", "unittest", "unittest.mock"],
    "email": ["email", "email.charset", "email.contentmanager", "email.feedparser", "email.generator",
              "email.header", "email.headerregistry", "email.message", "email.mime.base", "email.mime.multipart",
              "email.mime.text", "email.parser", "email.policy", "email.utils", "mailbox", "mimetypes"],
    "cli-logging": ["argparse", "getopt", "logging", "logging.config", "logging.handlers", "warnings"],
}
GROUP_NAMES = list(GROUPS)

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)")  # old-style C docstrings open with "name(args) -> result"
_WORD = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------------------------------------- the model


class SelfAttention(nn.Module):
    """Multi-head self-attention from plain ops; `bias` is the additive key mask, [batch, 1, 1, seq]."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads, self.scale = heads, 1.0 / math.sqrt(d_model // heads)
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [b, h, s, d/h], no Python sizes
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.o(out.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.fc1, self.fc2 = nn.Linear(d_model, ff), nn.Linear(ff, d_model)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), bias))
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(self.ln2(x))))))


class TextEncoder(nn.Module):
    """Sentence encoder: ids + mask (int64 [batch, seq], seq <= max_len) -> L2-normalised [batch, d_model]."""

    def __init__(self, vocab_size: int = VOCAB_WORDS + len(SPECIALS), max_len: int = MAX_LEN, d_model: int = 64,
                 heads: int = 4, layers: int = 2, ff: int = 128, dropout: float = 0.1):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ff, dropout) for _ in range(layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1  # 0..seq-1 without reading a size
        x = self.drop(self.tok(input_ids) + self.pos(positions))
        m = attention_mask.to(x.dtype)
        bias = ((1.0 - m) * -1e4)[:, None, None, :]  # padding keys get exp(-1e4) = 0 weight
        for layer in self.layers:
            x = layer(x, bias)
        x = self.ln_out(x)
        w = m.unsqueeze(-1)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, p=2.0, dim=-1)


def text_encoder(vocab_size: int = VOCAB_WORDS + len(SPECIALS), max_len: int = MAX_LEN, d_model: int = 64,
                 heads: int = 4, layers: int = 2, ff: int = 128) -> TextEncoder:
    """The config's factory (dropout is a training detail: the exported model runs in eval mode)."""
    return TextEncoder(vocab_size=vocab_size, max_len=max_len, d_model=d_model, heads=heads, layers=layers, ff=ff)


class _Classifier(nn.Module):
    """Training only: a cosine-style linear head over the module groups on the L2-normalised embedding."""

    def __init__(self, encoder: TextEncoder, classes: int, scale: float = 10.0):
        super().__init__()
        self.encoder, self.scale = encoder, scale
        self.head = nn.Linear(encoder.ln_out.normalized_shape[0], classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(ids, mask) * self.scale)


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_text_encoder(ids: np.ndarray, mask: np.ndarray, y: np.ndarray, epochs: int = 10, seed: int = 0,
                       classes: int | None = None, **kwargs) -> TextEncoder:
    """Deterministic training (fixed seed, fixed thread count) with a group-classification head; returns the
    encoder alone, in eval mode."""
    classes = int(classes if classes is not None else y.max() + 1)
    with _threads(TRAIN_THREADS):
        torch.manual_seed(seed)
        model = _Classifier(TextEncoder(**kwargs), classes)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        it, mt, yt = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y)
        g = torch.Generator().manual_seed(seed)
        steps = epochs * math.ceil(len(it) / 32)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(it), generator=g).split(32):
                opt.zero_grad()
                # trim the batch to its longest sentence: same result, less work
                s = int(mt[idx].sum(1).max())
                F.cross_entropy(model(it[idx, :s], mt[idx, :s]), yt[idx], label_smoothing=0.1).backward()
                opt.step()
                sched.step()
    return model.encoder.eval()


@torch.no_grad()
def embed(model: TextEncoder, ids: np.ndarray, mask: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(ids[i:i + batch]), torch.from_numpy(mask[i:i + batch])).numpy()
           for i in range(0, len(ids), batch)]
    return np.concatenate(out)


def retrieval_at_1(emb: np.ndarray, y: np.ndarray) -> float:
    """Share of samples whose nearest other sample by cosine has the same label."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return float((y[sim.argmax(1)] == y).mean())


def chance_at_1(y: np.ndarray) -> float:
    """Expected retrieval@1 of a random neighbour: sum over labels of p(label)^2 (slightly over, as self counts)."""
    p = np.bincount(y) / len(y)
    return float((p ** 2).sum())


# ---------------------------------------------------------------------------------------------- the text


def _first_paragraph(doc: str) -> str | None:
    for par in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        par = " ".join(par.split())
        if par and not _SIGNATURE.match(par):
            return par
    return None


def _own(obj, modname: str) -> bool:
    """Defined by this module (or its C accelerator: _io for io, posix for os), not a re-export."""
    owner = getattr(obj, "__module__", None)
    if owner is None:
        return True
    top, key = modname.split(".")[0], owner.lstrip("_").split(".")[0]
    return key == top or (top == "os" and key in ("posix", "nt"))


def _patched_in(member) -> bool:
    """Set on a standard-library class by a package outside the standard library (transformers adds
    logging.Logger.warning_once when imported): the sentences would depend on what the process imported first."""
    code = member.fget if isinstance(member, property) else member
    owner = getattr(code, "__module__", None)
    return isinstance(owner, str) and owner.split(".")[0] not in sys.stdlib_module_names


def _module_docs(modname: str) -> list[str]:
    mod = importlib.import_module(modname)
    objs = [mod]
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if not _own(obj, modname):
            continue
        objs.append(obj)
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                member = vars(obj)[mname]
                if mname.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if _patched_in(member):
                    continue
                if isinstance(member, property) or callable(member):
                    objs.append(member)
    out = []
    for obj in objs:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and (par := _first_paragraph(doc)) and 4 <= len(par.split()) <= 32:
            out.append(par)
    return out


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def collect_sentences() -> tuple[list[tuple[str, int]], list[str]]:
    """(sentence, group label) sorted by (label, sentence), distinct by text and by word sequence (first
    MAX_LEN - 1 words); sentences found in two groups dropped. Also the modules that did not import."""
    found: dict[str, set[int]] = {}
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, (_, modules) in enumerate(GROUPS.items()):
            for modname in modules:
                try:
                    docs = _module_docs(modname)
                except Exception:  # noqa: BLE001 - a module missing from this Python build is skipped
                    skipped.append(modname)
                    continue
                for d in docs:
                    found.setdefault(d, set()).add(label)
    by_words: dict[tuple[str, ...], set[int]] = {}
    first: dict[tuple[str, ...], str] = {}
    for text in sorted(found):
        labels = found[text]
        key = tuple(words(text)[: MAX_LEN - 1])
        if len(key) < 3:
            continue
        by_words.setdefault(key, set()).update(labels)
        first.setdefault(key, text)
    out = [(first[k], next(iter(v))) for k, v in by_words.items() if len(v) == 1]
    return sorted(out, key=lambda t: (t[1], t[0])), skipped


def build_vocab(texts: list[str], size: int = VOCAB_WORDS) -> list[str]:
    """[PAD], [UNK], [CLS], then the `size` most frequent words (ties alphabetical)."""
    counts = Counter(w for t in texts for w in words(t))
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return SPECIALS + [w for w, _ in top]


def encode(texts: list[str], vocab: list[str], max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask, int64 [N, max_len]: [CLS], word ids (truncated), [PAD]..."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.full((len(texts), max_len), PAD, dtype=np.int64)
    for r, t in enumerate(texts):
        row = [CLS] + [index.get(w, UNK) for w in words(t)][: max_len - 1]
        ids[r, : len(row)] = row
    return ids, (ids != PAD).astype(np.int64)


def length_bucket(mask: np.ndarray) -> np.ndarray:
    n = mask.sum(1)
    short, medium = LENGTH_BUCKETS
    return np.where(n <= short, "short", np.where(n <= medium, "medium", "long"))


# ---------------------------------------------------------------------------------------------- the build


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _assign_splits(sentences: list[tuple[str, int]]) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Seeded shuffle; train takes the first rows and fixes the vocabulary; the other splits take the next rows
    whose token ids no earlier row has (a sentence of unknown words can encode like another one)."""
    order = np.random.default_rng(0).permutation(len(sentences))
    rows = [sentences[i] for i in order]
    n_train = SPLITS["train"]
    vocab = build_vocab([t for t, _ in rows[:n_train]])
    seen: set[bytes] = set()
    splits: dict[str, list[tuple[str, int]]] = {k: [] for k in SPLITS}
    names = iter(SPLITS)
    current = next(names)
    for i, (text, label) in enumerate(rows):
        if current == "train" and i >= n_train:
            current = next(names)
        key = encode([text], vocab)[0].tobytes()
        if key in seen:
            continue
        seen.add(key)
        splits[current].append((text, label))
        if current != "train" and len(splits[current]) == SPLITS[current]:
            current = next(names, None)
            if current is None:
                break
    if len(splits["pool"]) < MIN_POOL:
        raise RuntimeError(f"only {len(splits['pool'])} distinct pool sentences (need {MIN_POOL}): this Python's "
                           f"docstrings gave {len(sentences)} sentences")
    return splits, vocab


def _build(root: Path) -> dict:
    import pandas as pd
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    sentences, skipped = collect_sentences()
    splits, vocab = _assign_splits(sentences)
    (root / "vocab.json").write_text(json.dumps(vocab, indent=0))

    arrays = {}
    for name, rows in splits.items():
        ids, mask = encode([t for t, _ in rows], vocab)
        arrays[name] = (ids, mask, np.array([g for _, g in rows], dtype=np.int64))
    for name in ("train", "validation", "test"):
        ids, mask, y = arrays[name]
        _write_npz(root / f"{name}.npz", input_ids=ids, attention_mask=mask, y=y)
    pd.DataFrame([{"split": name, "index": i, "source": GROUP_NAMES[g], "text": t}
                  for name, rows in splits.items() for i, (t, g) in enumerate(rows)]).to_csv(root / "texts.csv",
                                                                                             index=False)

    # The capture pool: the real pool sentences, then planted faults for the calibration filters.
    rng = np.random.default_rng(1)
    pids, pmask, py = arrays["pool"]
    parts = [(pids, pmask, py, ["pool"] * len(pids))]
    taken = set()
    for origin, split in (("duplicate", "pool"), ("train-copy", "train"), ("test-copy", "test")):
        ids, mask, y = arrays[split]
        pick = rng.choice(len(ids), FAULTS[origin], replace=False)
        taken.update(pick.tolist() if split == "pool" else [])
        parts.append((ids[pick], mask[pick], y[pick], [origin] * len(pick)))
    # augmented: a pool sentence with one word (not [CLS]) deleted, flagged augmented=true
    known = {r.tobytes() for name in arrays for r in arrays[name][0]}
    aug_ids, aug_y = [], []
    for i in rng.permutation(len(pids)):
        n = int(pmask[i].sum())
        if i in taken or n < 6:
            continue
        drop = int(rng.integers(1, n))
        row = np.concatenate([np.delete(pids[i], drop), [PAD]])
        if row.tobytes() in known:
            continue
        known.add(row.tobytes())
        aug_ids.append(row)
        aug_y.append(py[i])
        if len(aug_ids) == FAULTS["augmented"]:
            break
    aug_ids = np.stack(aug_ids)
    parts.append((aug_ids, (aug_ids != PAD).astype(np.int64), np.array(aug_y, np.int64),
                  ["augmented"] * len(aug_ids)))
    cids = np.concatenate([p[0] for p in parts])
    cmask = np.concatenate([p[1] for p in parts])
    cy = np.concatenate([p[2] for p in parts])
    origin = [o for p in parts for o in p[3]]
    cap = root / "captures"
    cap.mkdir(parents=True, exist_ok=True)
    _write_npz(cap / "captures.npz", input_ids=cids, attention_mask=cmask)
    pd.DataFrame({"capture_id": [f"cap_{i:04d}" for i in range(len(cids))], "index": np.arange(len(cids)),
                  "source": [GROUP_NAMES[g] for g in cy], "length": length_bucket(cmask),
                  "augmented": [o == "augmented" for o in origin],
                  "simulated_origin": origin}).to_csv(cap / "metadata.csv", index=False)

    t0 = time.perf_counter()
    ids, mask, y = arrays["train"]
    model = train_text_encoder(ids, mask, y, classes=len(GROUP_NAMES))
    train_s = time.perf_counter() - t0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "text_encoder.safetensors"))
    ret = {}
    with _threads(TRAIN_THREADS):
        for name in ("validation", "test"):
            ids, mask, y = arrays[name]
            ret[name] = round(retrieval_at_1(embed(model, ids, mask), y), 4)
    text_sha = hashlib.sha256("\n".join(f"{g}\t{t}" for t, g in sentences).encode()).hexdigest()
    return {"version": TEXT_DEMO_VERSION, "python": sys.version.split()[0], "sentences": len(sentences),
            "sentences_sha256": text_sha, "skipped_modules": skipped, "groups": GROUP_NAMES,
            "vocab_size": len(vocab), "splits": {k: len(v) for k, v in splits.items()}, "pool_rows": len(cids),
            "faults": dict(Counter(o for o in origin if o != "pool")),
            "arrays_sha256": {k: _digest(*v) for k, v in arrays.items()},
            "retrieval_at_1": ret, "retrieval_chance": round(chance_at_1(arrays["test"][2]), 4),
            "train_seconds": round(train_s, 2)}


def ensure_text_demo(root: str | Path = ".edgeq/text-demo") -> Path:
    """Build the text demo's data and encoder into `root` unless it is already there (then a no-op)."""
    return build_once(root, TEXT_DEMO_VERSION, _build, _STAMP)


def train_text_demo(config, epochs: int = 10, seed: int = 0) -> TextEncoder:
    """Training entrypoint for `retrain_to_deploy`: the encoder trained from scratch on the config's training
    split (an .npz with input_ids, attention_mask and y; read as it is, nothing is preprocessed)."""
    src = config.data.train
    if src is None or src.path is None:
        raise ValueError("the text demo trainer needs data.train (an .npz with input_ids, attention_mask, y)")
    with np.load(src.path) as z:
        missing = {"input_ids", "attention_mask", "y"} - set(z.files)
        if missing:
            raise ValueError(f"data.train ({src.path}) lacks {sorted(missing)}")
        ids, mask, y = z["input_ids"].astype(np.int64), z["attention_mask"].astype(np.int64), z["y"].astype(np.int64)
    kw = {k: v for k, v in config.model.kwargs.items() if k in ("vocab_size", "max_len", "d_model", "heads",
                                                                 "layers", "ff")}
    return train_text_encoder(ids, mask, y, epochs=epochs, seed=seed, classes=len(GROUP_NAMES), **kw)

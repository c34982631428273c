"""The demos the tests use, built once for all pytest-xdist workers (started by tests/conftest.py's controller).

    python -m tests.prebuild digits|text FOLDER CPUS

Builds into FOLDER/<kind> on the CPUs listed in CPUS (comma-separated; empty: any), then writes FOLDER/<kind>.done
(or <kind>.failed with the traceback). Every worker's session fixture waits for the .done file and uses that one
build; each worker used to build both demos itself (35 s and 21 s on one CPU) while the other worker built the
same.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

# The demo CNN without its wide head (model.kwargs.hidden 0), trained beside the demo: most tests run it, several
# times faster to export, quantize and train than the demo's. Its INT8 model is slower than FP32 on a CPU (0.05 ms
# a sample: the quantize/dequantize steps cost more than the integer kernels save), so its configs turn the speed
# gate off; the demo's own model, with the gate on, runs in test_demo.py and test_convert_flow.py.
# tests/conftest.py re-exports the name.
SMALL_WEIGHTS = "digits_cnn_small.safetensors"


def build(kind: str, out: Path) -> Path:
    if kind == "digits":
        import numpy as np
        import safetensors.torch

        from edgeq.demo import ensure_demo, train_digits_net

        root = ensure_demo(out)
        with np.load(root / "train.npz") as z:
            small = train_digits_net(z["x"].astype(np.float32) / 255.0, z["y"], epochs=40, hidden=0)
        tmp = root / (SMALL_WEIGHTS + ".tmp")
        safetensors.torch.save_file(small.state_dict(), tmp)
        os.replace(tmp, root / SMALL_WEIGHTS)
        return root
    if kind == "text":
        from edgeq.demo_text import ensure_text_demo

        return ensure_text_demo(out)
    raise ValueError(f"unknown demo {kind!r}: digits or text")


def main(kind: str, folder: str, cpus: str = "") -> int:
    folder_ = Path(folder)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    try:
        root = build(kind, folder_ / kind)
    except BaseException:  # noqa: BLE001 - a worker then builds for itself, and fails there with the same error
        (folder_ / f"{kind}.failed").write_text(traceback.format_exc())
        return 1
    (folder_ / f"{kind}.done").write_text(str(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

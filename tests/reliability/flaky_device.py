"""A stand-in edge device that is busy for its first N calls (exit 75, EX_TEMPFAIL), then runs the model.

    python flaky_device.py --fail-first N --counter FILE MODEL INPUTS.npz OUTPUTS.npz

N = -1: busy forever (a persistent fault). The counter file counts every call, so a test can read it.
"""

import sys
from pathlib import Path

args = sys.argv[1:]
fail_first, counter = int(args[1]), Path(args[3])
model, inputs, outputs = args[4:]
calls = int(counter.read_text()) + 1 if counter.is_file() else 1
counter.write_text(str(calls))
if fail_first < 0 or calls <= fail_first:
    print(f"device busy (call {calls})", file=sys.stderr)
    sys.exit(75)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
with np.load(inputs) as z:
    feeds = {k: z[k] for k in z.files}
np.savez(outputs, **{o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, feeds))})

"""A stand-in edge device for the `command` backend: runs the model with ONNX Runtime, then adds noise.

    python noisy_device.py [--noise SIGMA] MODEL INPUTS.npz OUTPUTS.npz
"""

import sys

import numpy as np
import onnxruntime as ort

args = sys.argv[1:]
sigma = 0.0
if args[0] == "--noise":
    sigma, args = float(args[1]), args[2:]
model, inputs, outputs = args
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
with np.load(inputs) as z:
    feeds = {k: z[k] for k in z.files}
outs = sess.run(None, feeds)
rng = np.random.default_rng(0)
np.savez(outputs, **{o.name: (v + rng.normal(0, sigma, v.shape)).astype(v.dtype) if sigma else v
                     for o, v in zip(sess.get_outputs(), outs)})

"""A stand-in edge device for the `command` backend: runs the model with ONNX Runtime, then changes its outputs
the way a faulty device would.

    python noisy_device.py [--noise SIGMA] [--shift DELTA] [--flip-margins LO HI] [--first-row-only]
                           [--refuse-int8] MODEL INPUTS.npz OUTPUTS.npz

--noise SIGMA         add seeded Gaussian noise to every value
--shift DELTA         add DELTA to every value: every sample keeps its ranking
--flip-margins LO HI  on each sample whose top-1 margin (best minus runner-up) lies in (LO, HI), lower the best
                      and raise the runner-up by 0.51 x that margin: the two swap places, and no value moves by
                      more than 0.51 x HI
--first-row-only      return the first sample's outputs only (an output of the wrong shape)
--refuse-int8         fail (exit 1) on a model with QuantizeLinear nodes, as a device without INT8 kernels would
"""

import argparse
import sys

import numpy as np
import onnxruntime as ort

parser = argparse.ArgumentParser()
parser.add_argument("--noise", type=float, default=0.0)
parser.add_argument("--shift", type=float, default=0.0)
parser.add_argument("--flip-margins", type=float, nargs=2, default=None)
parser.add_argument("--first-row-only", action="store_true")
parser.add_argument("--refuse-int8", action="store_true")
parser.add_argument("model")
parser.add_argument("inputs")
parser.add_argument("outputs")
args = parser.parse_args()

if args.refuse_int8:
    import onnx

    if any(n.op_type == "QuantizeLinear" for n in onnx.load(args.model, load_external_data=False).graph.node):
        sys.exit("this device has no INT8 kernels: QuantizeLinear is not supported")

sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
with np.load(args.inputs) as z:
    feeds = {k: z[k] for k in z.files}
outs = sess.run(None, feeds)
rng = np.random.default_rng(0)


def change(v: np.ndarray) -> np.ndarray:
    out = v.astype(np.float64)
    if args.noise:
        out = out + rng.normal(0, args.noise, v.shape)
    out = out + args.shift
    if args.flip_margins and out.ndim == 2 and out.shape[1] > 1:
        lo, hi = args.flip_margins
        order = np.argsort(out, axis=1)
        rows = np.arange(len(out))
        best, second = order[:, -1], order[:, -2]
        margin = out[rows, best] - out[rows, second]
        flip = (margin > lo) & (margin < hi)
        out[rows[flip], best[flip]] -= 0.51 * margin[flip]
        out[rows[flip], second[flip]] += 0.51 * margin[flip]
    if args.first_row_only:
        out = out[:1]
    return out.astype(v.dtype)


np.savez(args.outputs, **{o.name: change(v) for o, v in zip(sess.get_outputs(), outs)})

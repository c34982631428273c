"""FP32 vs INT8: batch-1 latency on ONNX Runtime and OpenVINO (pinned f32), and accuracy, side by side.

    python -m edgeq.benchmarks.quantization [--size 64] [--epochs 3] [--iters 200]

Models: the demo CNN (8x8 digits), and a ResNet-18-shaped and a MobileNetV2-shaped model defined here,
trained briefly on the digits upscaled to SIZE x SIZE x 3 so accuracy means something. INT8 is ONNX
Runtime static QDQ PTQ (pre-processing, U8S8, per-channel, MinMax) calibrated on the demo's capture
pool. Everything is measured in one process, one model after another, so ratios are comparable
even on a noisy shared machine; absolute milliseconds are not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq.core.quiet import quiet_environment


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (BasicBlock x [2, 2, 2, 2], widths 64..512)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2's layout (inverted residuals, t/c/n/s table of the paper)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()], 32
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def upscale(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(x.astype(np.float32) / 255.0)
    t = nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.repeat(1, 3, 1, 1).numpy()


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batches = (len(xt) + 31) // 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * batches)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def export(model: nn.Module, example: np.ndarray, path: Path) -> None:
    torch.onnx.export(model, (torch.from_numpy(example),), str(path), input_names=["image"], output_names=["logits"],
                      opset_version=18, dynamic_axes={"image": {0: "batch"}}, dynamo=True, external_data=False,
                      verbose=False)


def paired_latency(fp32: Path, int8: Path, backend_name: str, sample: np.ndarray, iters: int,
                   rounds: int = 5) -> tuple[float, float, str]:
    """FP32 and INT8 batch-1 medians, measured in alternating rounds so machine noise hits both alike."""
    from edgeq.backends import benchmark, get_backend
    from edgeq.core.specs import TargetSpec

    target = TargetSpec(name=backend_name, backend=backend_name, precision="fp32")
    backend = get_backend(backend_name)
    feeds = {"image": sample[None]}
    with backend.runner(fp32, target) as rf, backend.runner(int8, target) as ri:
        f, i = [], []
        for _ in range(rounds):
            rep = benchmark(rf, feeds, warmup=10, iters=max(10, iters // rounds))
            f.append(rep.median_ms)
            i.append(benchmark(ri, feeds, warmup=10, iters=max(10, iters // rounds)).median_ms)
    return float(np.median(f)), float(np.median(i)), rep.precision


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from edgeq.export import run_onnx

    return float((run_onnx(path, x, "image", "logits").argmax(1) == y).mean())


def main() -> None:
    quiet_environment()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="input side for the ResNet-18-shaped model")
    ap.add_argument("--mobile-size", type=int, default=32, help="input side for the MobileNetV2-shaped model")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--demo-root", default=".edgeq/demo")
    args = ap.parse_args()

    from edgeq.calibration.readers import CalibrationReader
    from edgeq.core.modeling import load_state_dict
    from edgeq.core.platform import x86_without_vnni
    from edgeq.demo import digits_net, ensure_demo
    from edgeq.quantization.ptq import PTQSettings, quantize

    root = ensure_demo(args.demo_root)
    z = {k: np.load(root / f"{k}.npz") for k in ("train", "test", "pool")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = digits_net()
        demo.load_state_dict(load_state_dict(root / "digits_cnn.safetensors"))
        models = [("demo-cnn 1x8x8", demo.eval(), lambda a: a.astype(np.float32) / 255.0)]
        for name, factory, size in (("resnet18-shaped", ResNet18, args.size),
                                    ("mobilenetv2-shaped", MobileNetV2, args.mobile_size)):
            t0 = time.perf_counter()
            m = train(factory(), upscale(z["train"]["x"], size), z["train"]["y"], args.epochs)
            print(f"trained {name} in {time.perf_counter() - t0:.0f} s")
            models.append((f"{name} 3x{size}x{size}", m, lambda a, size=size: upscale(a, size)))
        for name, model, prep in models:
            xt, yt = prep(z["test"]["x"]), z["test"]["y"]
            calib = prep(z["pool"]["x"][:256])
            fp32, int8 = tmp / f"{name.split()[0]}.onnx", tmp / f"{name.split()[0]}-int8.onnx"
            export(model, xt[:2], fp32)
            quantize(fp32, int8, CalibrationReader({"image": calib}),
                     PTQSettings.from_spec(reduce_range=x86_without_vnni()))
            row = {"model": name, "fp32 top1": accuracy(fp32, xt, yt), "int8 top1": accuracy(int8, xt, yt)}
            for b in ("onnxruntime", "openvino"):
                f_ms, i_ms, f_prec = paired_latency(fp32, int8, b, xt[0], args.iters)
                row[f"{b} fp32 ms"], row[f"{b} int8 ms"], row[f"{b} speedup"] = f_ms, i_ms, f_ms / i_ms
                row[f"{b} fp32 ran as"] = f_prec
            rows.append(row)
            print(f"measured {name}")

    import pandas as pd

    df = pd.DataFrame(rows).set_index("model")
    df["top1 drop (pp)"] = 100 * (df["fp32 top1"] - df["int8 top1"])
    pd.set_option("display.width", 200)
    print()
    print(df.round(3).T.to_string())
    print()
    print("targets: INT8 >= 3x faster than true FP32 on both runtimes for the ResNet-18-shaped model; "
          "top-1 within 0.5 pp of FP32 on every model")


if __name__ == "__main__":
    main()

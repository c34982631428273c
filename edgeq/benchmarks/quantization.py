"""ResNet-18, MobileNetV2 and the transformer demo through edgeq's own pipeline (`auto`), FP32 vs INT8 side by side,
beside the peer recipe.

    python -m edgeq.benchmarks.quantization [--models resnet18 mobilenetv2 text-encoder] [--latency-size 224]
                                            [--accuracy-size 32] [--epochs 6] [--rounds 5] [--iters 20]

Models: a ResNet-18-shaped and a MobileNetV2-shaped network defined here (torchvision's layouts; PyPI's torchvision
does not import beside this torch), trained briefly on the demo digits upscaled to ACCURACY-SIZE^2 x 3. Both are
fully convolutional up to a global average pool, so the same weights run at LATENCY-SIZE^2 (224: the size the
published figures use).

Each model goes through what `edgeq convert` runs, twice: once at the accuracy size (the INT8 SLA: top-1 drop
<= 0.5 pp on the validation split; the top-1 drop reported is on the test split) and once at the latency size
(the SLA relaxed: weights trained at a small size score nothing meaningful at 224, only the speed is measured there).
Each run: the demo's capture pool upscaled, built into a calibration version and approved; export with its gates;
quantization in mode `auto` (the policy and the ladder choose the attempt; the speed gate is off so that a slower
INT8 model is reported, not refused), deployment target ONNX Runtime, OpenVINO the second target with
`quantization.target_forms: fastest` (it gets NNCF's model when that runs more than 5 % faster on OpenVINO; the
OpenVINO rows below time the model OpenVINO gets).

At the latency size, beside edgeq's INT8 model, the peer recipe: NNCF's default post-training quantization of the
OpenVINO model (`nncf.quantize` on `openvino.Core().read_model(fp32.onnx)`, the same calibration samples), run by
OpenVINO. The transformer demo (`text-demo.yaml`: the sentence encoder, int64 token ids and mask, seq 32, scored
by cosine to FP32) goes through the same pipeline once, with its own SLA and weights, timed on its first test sample;
its peer recipe is NNCF's PTQ for transformers (`model_type=TRANSFORMER`). Timed side by side in one process: on
ONNX Runtime FP32 and INT8, on OpenVINO FP32 (inference precision pinned to f32), INT8 and the peer's INT8, in
ROUNDS rounds whose order rotates (drift on a shared machine hits all alike); each model's median of round medians,
and per-round ratios (median and range). The quantization stage's own speed verdict is compared with this
independent measurement. The CPU's ISA is printed first: ratios differ by machine (integer dot products need VNNI or
AMX on x86). The last lines say which targets are met.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq.calibration.readers import CalibrationReader
from edgeq.core.quiet import muted_output, quiet_environment


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


def upscaled_dataset(root: Path, out: Path, size: int, splits=("validation", "test")) -> Path:
    """The demo's splits and capture pool upscaled to 3 x size x size uint8 (the capture metadata as is)."""

    def u8(x):
        return np.clip(np.rint(upscale(x, size) * 255.0), 0, 255).astype(np.uint8)

    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        with np.load(root / f"{split}.npz") as z:
            np.savez(out / f"{split}.npz", x=u8(z["x"]), y=z["y"])
    (out / "captures").mkdir(exist_ok=True)
    with np.load(root / "pool.npz") as z:
        np.savez(out / "captures" / "pool.npz", x=u8(z["x"]))  # rows in metadata order
    shutil.copy(root / "captures" / "metadata.csv", out / "captures" / "metadata.csv")
    return out


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
            # label smoothing keeps the logits small, as the demo's (tight export parity in float32)
            nn.functional.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=0.1).backward()
            opt.step()
            sched.step()
    return model.eval()


FACTORIES = {"resnet18": ("ResNet18", ResNet18), "mobilenetv2": ("MobileNetV2", MobileNetV2)}
TEXT = "text-encoder"  # the transformer demo (text-demo.yaml), as it is


def config(name: str, factory: str, weights: Path, data: Path, size: int, store: Path, max_drop: float,
           rounds: int, iters: int, folder: Path) -> Path:
    """An edgeq config for `factory` at `size`, as a user would write it: mode auto, ONNX Runtime the deployment
    target, OpenVINO the second; the speed gate off (the benchmark reports a slower INT8 model instead). A training
    split where `data` has one (the accuracy size): the ladder may then climb to QAT."""
    import yaml

    splits = [s for s in ("train", "validation", "test") if (data / f"{s}.npz").is_file()]
    arrays = {split: {"kind": "arrays", "path": str(data / f"{split}.npz")} for split in splits}
    cfg = {
        "name": f"benchmark-{name}-{size}", "store": str(store),
        "model": {"name": f"{name}-{size}", "factory": f"edgeq.benchmarks.quantization:{factory}",
                  "kwargs": {"num_classes": 10}, "weights": str(weights),
                  "inputs": [{"name": "image", "shape": ["batch", 3, size, size]}], "outputs": ["logits"],
                  "example_dims": {"batch": 2}, "metric": "top1"},
        "targets": [{"name": "ort-cpu", "backend": "onnxruntime"}, {"name": "openvino-cpu", "backend": "openvino"}],
        "data": {"preprocess": {"scale": 1 / 255}, **arrays,
                 "captures": {"path": str(data / "captures" / "pool.npz"),
                              "metadata": str(data / "captures" / "metadata.csv"),
                              "strata": ["lighting", "camera", "time_of_day"], "target_size": 128, "min_size": 64}},
        "thresholds": {"int8_max_drop": max_drop, "int8_min_speedup": 0},
        "quantization": {"mode": "auto", "latency_iters": max(10, iters), "speed_rounds": rounds,
                         "deploy_target": "ort-cpu", "target_forms": "fastest"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{size}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def convert(path: Path):
    """Calibration version (built, approved), export, quantization: what `edgeq convert` runs up to the INT8 model,
    as plain functions. Returns (config, FP32 path, INT8 path, quantization report, calibration reader, the INT8
    path OpenVINO gets)."""
    from edgeq.calibration.versions import record_decision
    from edgeq.core.store import ArtifactStore
    from edgeq.tasks.calibration import build_calibration_candidate
    from edgeq.tasks.config import load_prepared
    from edgeq.tasks.export import export_to_store
    from edgeq.tasks.quantize import quantize_to_store, resolve_calibration

    cfg = load_prepared(path)
    store = ArtifactStore(cfg.store_url)
    version = build_calibration_candidate(cfg).version.version
    record_decision(store, version, approve=True, reviewer="quantization-benchmark", comment="benchmark only")
    exported = export_to_store(cfg)
    quantized = quantize_to_store(cfg, exported.onnx, version, exported.report.opset, log=lambda line: None)
    calib = resolve_calibration(cfg, version)
    ov = quantized.forms.get("openvino-cpu", quantized.int8)  # what OpenVINO gets (quantization.target_forms)
    return (cfg, store.local_path(exported.onnx), store.local_path(quantized.int8), quantized.report, calib,
            store.local_path(ov))


def peer_recipe(fp32: Path, calib: CalibrationReader, out: Path, transformer: bool = False) -> Path:
    """NNCF's default post-training quantization of the OpenVINO model (for a transformer, NNCF's transformer
    preset), fed every input from the calibration reader, saved as OpenVINO IR."""
    import openvino as ov

    from edgeq.core.quiet import import_nncf

    nncf = import_nncf()
    model = ov.Core().read_model(str(fp32))
    # Batch 1, every other axis as the model has it (a dynamic sequence axis stays dynamic): as edgeq's OpenVINO
    # target prepares its models, so that both run in the same shape regime.
    shapes = {}
    for p in model.inputs:
        shape = p.get_partial_shape()
        shape[0] = ov.Dimension(1)
        shapes[p.get_any_name()] = shape
    model.reshape(shapes)
    preset = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with muted_output(stderr=True):  # NNCF's progress bars
        quantized = nncf.quantize(model, calib.as_nncf_dataset(), subset_size=len(calib), **preset)
    ov.save_model(quantized, str(out))
    return out


def side_by_side(models: dict[str, Path], backend_name: str, feeds: dict[str, np.ndarray], rounds: int,
                 iters: int) -> dict[str, list[float]]:
    """Per-round median ms of every model on one runtime, timed in rotating order (FP32 pinned to f32)."""
    from edgeq.backends import get_backend, interleaved_benchmark
    from edgeq.backends.openvino import OpenVinoRunner
    from edgeq.core.specs import TargetSpec

    target = TargetSpec(name=backend_name, backend=backend_name, precision="fp32")
    backend = get_backend(backend_name)

    def runner(path: Path):  # an OpenVINO IR (the peer's) runs as it is; an ONNX model as edgeq's target prepares it
        return OpenVinoRunner(path, target) if path.suffix == ".xml" else backend.runner(path, target)

    with ExitStack() as stack:
        runners = [stack.enter_context(runner(p)) for p in models.values()]
        times = interleaved_benchmark(runners, feeds, rounds, iters)
    return dict(zip(models, times))


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and range of the per-round ratios a/b."""
    rs = [x / y for x, y in zip(a, b)]
    return statistics.median(rs), min(rs), max(rs)


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def main() -> None:
    quiet_environment()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*FACTORIES, TEXT], choices=[*FACTORIES, TEXT])
    ap.add_argument("--latency-size", type=int, default=224)
    ap.add_argument("--accuracy-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6, help="training epochs at the accuracy size")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the side-by-side timing")
    ap.add_argument("--iters", type=int, default=20, help="timed batch-1 runs per model per round")
    ap.add_argument("--demo-root", default=".edgeq/demo")
    ap.add_argument("--text-demo-root", default=".edgeq/text-demo")
    args = ap.parse_args()

    from edgeq.core.platform import cpu_isa
    from edgeq.demo import ensure_demo

    isa = cpu_isa()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                isa["processor"] or isa["machine"])
    print(f"CPU: {name}, ISA {' '.join(isa['isa'])}; torch threads {torch.get_num_threads()}")
    root = ensure_demo(args.demo_root)
    work = Path(tempfile.mkdtemp(prefix="edgeq-qbench-"))
    data = {args.accuracy_size: upscaled_dataset(root, work / "data-acc", args.accuracy_size,
                                                 ("train", "validation", "test")),
            args.latency_size: upscaled_dataset(root, work / "data-lat", args.latency_size)}
    results = {}
    try:
        for name in args.models:
            try:
                results[name] = measure_text(args, work) if name == TEXT else measure(name, args, root, work, data)
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row of the report, not the end of it
                print(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args, isa)


def measure(name: str, args, root: Path, work: Path, data: dict[int, Path]) -> dict:
    """One model through the pipeline at both sizes, the peer recipe, and the side-by-side timings."""
    import safetensors.torch

    from edgeq.export import run_onnx

    factory, cls = FACTORIES[name]
    t0 = time.perf_counter()
    torch.manual_seed(0)  # the initial weights, whichever model ran before
    with np.load(root / "train.npz") as z:
        model = train(cls(), upscale(z["x"], args.accuracy_size), z["y"], args.epochs)
    weights = work / f"{name}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    print(f"{name}: trained at {args.accuracy_size}x{args.accuracy_size} in {time.perf_counter() - t0:.0f} s")

    t0 = time.perf_counter()
    _, fp32_s, int8_s, rep_s, _, _ = convert(config(
        name, factory, weights, data[args.accuracy_size], args.accuracy_size, work / f"store-{name}-acc",
        0.005, args.rounds, args.iters, work / "cfg"))
    with np.load(data[args.accuracy_size] / "test.npz") as z:
        x, y = z["x"].astype(np.float32) / 255.0, z["y"]
    top1 = {k: float((run_onnx(p, x, "image", "logits").argmax(1) == y).mean())
            for k, p in (("fp32", fp32_s), ("int8", int8_s))}
    print(f"{name}: accuracy run at {args.accuracy_size}^2 in {time.perf_counter() - t0:.0f} s: chose "
          f"{rep_s.chosen_attempt.label}; test top-1 FP32 {top1['fp32']:.4f} INT8 {top1['int8']:.4f}")

    t0 = time.perf_counter()
    _, fp32, int8, rep, calib, int8_ov = convert(config(
        name, factory, weights, data[args.latency_size], args.latency_size, work / f"store-{name}-lat",
        1.0, args.rounds, args.iters, work / "cfg"))
    peer = peer_recipe(fp32, calib, work / f"{name}-peer.xml")
    print(f"{name}: latency run at {args.latency_size}^2 in {time.perf_counter() - t0:.0f} s: chose "
          f"{rep.chosen_attempt.label}; its verdict: {rep.speed_note.splitlines()[0]}")
    for line in rep.speed_note.splitlines()[1:]:
        if line.startswith("speed remedy"):
            print(f"  {line}")
    for line in rep.forms_note.splitlines():
        print(f"  INT8 model for {line}")
    with np.load(data[args.latency_size] / "test.npz") as z:
        feeds = {"image": z["x"][:1].astype(np.float32) / 255.0}
    ort = side_by_side({"fp32": fp32, "int8": int8}, "onnxruntime", feeds, args.rounds, args.iters)
    ov = side_by_side({"fp32": fp32, "int8": int8_ov, "peer": peer}, "openvino", feeds, args.rounds, args.iters)
    deploy = rep.chosen_attempt.latency_on("ort-cpu")
    form = rep.target_forms.get("openvino-cpu")
    return {"label": rep.chosen_attempt.label, "top1": top1, "ort": ort, "ov": ov,
            "verdict": deploy.speedup if deploy else None,
            "ov_label": rep.attempts[form.attempt].label if form else rep.chosen_attempt.label}


def measure_text(args, work: Path) -> dict:
    """The transformer demo through the pipeline, the peer recipe, and the side-by-side timings on its first test
    sample (every input). Accuracy: the cosine of INT8 to FP32 embeddings on the test split (the demo's metric)."""
    from edgeq.benchmarks.pipeline import demo_config
    from edgeq.core.data import load_inputs
    from edgeq.core.metrics import cosine
    from edgeq.demo_text import ensure_text_demo
    from edgeq.export import run_onnx

    root = ensure_text_demo(args.text_demo_root).resolve()
    t0 = time.perf_counter()
    # text-demo.yaml as it is (its SLA, a cosine drop; its speed gate off) with the benchmark's quantization settings
    cfg, fp32, int8, rep, calib, int8_ov = convert(demo_config(
        work / "text", root, "text-demo.yaml",
        quantization={"mode": "auto", "latency_iters": max(10, args.iters), "speed_rounds": args.rounds,
                      "deploy_target": "ort-cpu", "target_forms": "fastest"}))
    peer = peer_recipe(fp32, calib, work / "text-encoder-peer.xml", transformer=True)
    test, _ = load_inputs(cfg.data.test, cfg.model.inputs, cfg.data.preprocess)
    out = cfg.model.outputs[0]
    emb = {k: run_onnx(p, test, outputs=[out])[out] for k, p in (("fp32", fp32), ("int8", int8))}
    cos = cosine(emb["int8"], None, emb["fp32"])
    chosen = rep.chosen_attempt
    print(f"{TEXT}: converted in {time.perf_counter() - t0:.0f} s: chose {chosen.label}; validation cosine "
          f"{chosen.metric:.4f} (drop {chosen.drop:+.4f}, SLA {cfg.thresholds.int8_max_drop}); its verdict: "
          f"{rep.speed_note.splitlines()[0]}")
    feeds = {n: a[:1] for n, a in test.items()}
    ort = side_by_side({"fp32": fp32, "int8": int8}, "onnxruntime", feeds, args.rounds, args.iters)
    ov = side_by_side({"fp32": fp32, "int8": int8_ov, "peer": peer}, "openvino", feeds, args.rounds, args.iters)
    deploy = chosen.latency_on("ort-cpu")
    form = rep.target_forms.get("openvino-cpu")
    return {"label": chosen.label, "ort": ort, "ov": ov, "verdict": deploy.speedup if deploy else None,
            "ov_label": rep.attempts[form.attempt].label if form else chosen.label,
            "cosine": {"validation": chosen.metric, "drop": chosen.drop, "sla": cfg.thresholds.int8_max_drop,
                       "test_mean": float(cos.mean()), "test_min": float(cos.min()), "n": len(cos)},
            "shape": " ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())}


def report(results: dict[str, dict], args, isa: dict) -> None:
    print(f"\nbatch 1, {args.latency_size}x{args.latency_size}x3 (the images); median of {args.rounds} rotating rounds "
          f"of {args.iters} runs (range over the rounds)")
    summary, info = [], []
    for name, r in results.items():
        if "error" in r:
            print(f"\n{name}: not measured: {r['error']}")
            summary.append((f"{name}: measured", False, r["error"]))
            continue
        med = {k: statistics.median(v) for k, v in {**{f"ort {k}": v for k, v in r["ort"].items()},
                                                    **{f"ov {k}": v for k, v in r["ov"].items()}}.items()}
        ort_x, ov_x = ratio(r["ort"]["fp32"], r["ort"]["int8"]), ratio(r["ov"]["fp32"], r["ov"]["int8"])
        peer_x, vs_peer = ratio(r["ov"]["fp32"], r["ov"]["peer"]), ratio(r["ov"]["int8"], r["ov"]["peer"])
        print(f"\n{name} (edgeq chose: {r['label']}; OpenVINO got: {r['ov_label']})")
        print("  ms: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
        print(f"  ONNX Runtime FP32/INT8 {fmt(ort_x)}; OpenVINO FP32/INT8 {fmt(ov_x)}; OpenVINO FP32/peer INT8 "
              f"{fmt(peer_x)}; edgeq INT8/peer INT8 on OpenVINO {fmt(vs_peer)}")
        agree = (r["verdict"] / ort_x[0] - 1) if r["verdict"] else None
        verdict = (f"the quantization stage's own verdict on ort-cpu {r['verdict'] or float('nan'):.2f}x, "
                   + (f"{agree:+.0%} from this measurement" if agree is not None else "not measured"))
        agrees = (f"{name}: the stage's verdict within 15 % of this measurement",
                  agree is not None and abs(agree) <= 0.15, "-" if agree is None else f"{agree:+.0%}")
        if "cosine" in r:  # the transformer demo: its own metric and SLA, and no speed target
            c = r["cosine"]
            print(f"  batch 1, {r['shape']}; cosine of INT8 to FP32 embeddings on the test split: mean "
                  f"{c['test_mean']:.4f}, least {c['test_min']:.4f} ({c['n']} samples); {verdict}")
            summary += [(f"{name}: INT8 meets its accuracy SLA (validation cosine drop <= {c['sla']})",
                         c["drop"] <= c["sla"], f"{c['drop']:+.4f}"), agrees]
            info += [(f"{name}: FP32/INT8", f"ORT {fmt(ort_x)}, OpenVINO {fmt(ov_x)}; edgeq INT8/peer INT8 on "
                      f"OpenVINO {fmt(vs_peer)}")]
            continue
        drop = 100 * (r["top1"]["fp32"] - r["top1"]["int8"])
        print(f"  top-1 drop {drop:+.2f} pp at {args.accuracy_size}^2 (test, FP32 {r['top1']['fp32']:.4f}); {verdict}")
        if name == "resnet18":
            summary += [("ResNet-18: ONNX Runtime INT8 >= 2.5x FP32", ort_x[0] >= 2.5, fmt(ort_x)),
                        ("ResNet-18: OpenVINO INT8 within 10 % of the peer recipe", vs_peer[0] <= 1.10,
                         f"INT8/peer {fmt(vs_peer)}")]
        else:
            summary += [(f"{name}: INT8 not slower than FP32 on either runtime", min(ort_x[0], ov_x[0]) >= 1.0,
                         f"ORT {fmt(ort_x)}, OpenVINO {fmt(ov_x)}")]
        summary += [(f"{name}: top-1 drop <= 0.5 pp", drop <= 0.5, f"{drop:+.2f} pp"), agrees]
    print("\ntargets (" + ", ".join(isa["isa"]) + "):")
    for what, ok, value in summary:
        print(f"  [{'met' if ok else 'NOT met'}] {what}: {value}")
    for what, value in info:
        print(f"  [no target] {what}: {value}")
    print(f"summary: {sum(ok for _, ok, _ in summary)} of {len(summary)} targets met on this CPU")


if __name__ == "__main__":
    main()

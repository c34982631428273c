"""FP32 vs the published INT8 model of a config, batch 1, on ONNX Runtime and OpenVINO, side by side.

    python -m edgeq.benchmarks.int8_speed CONFIG [--bundle ID] [--rounds 7] [--iters 100]

For any model edgeq converts (named inputs of any dtype): the FP32 ONNX model is the config's export (cached in
the store), the INT8 model the newest published bundle of the config's model (or --bundle). The feed is the first
real sample of the test split, every input. Both models run on the same runtime in alternating rounds (which one
goes first alternates too) so drift on a shared machine hits both alike; OpenVINO runs the FP32 model with its
inference precision pinned to f32 (its CPU plugin would otherwise pick bf16 where the CPU has it). Printed per
runtime: each model's median of round medians with the range (min-max), and the FP32/INT8 ratio's median and range
over the rounds. One run is one result on one machine: quote the CPU (printed first) with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from edgeq.core.quiet import quiet_environment


def newest_bundle_int8(cfg, bundle: str | None) -> tuple[str, Path]:
    """(bundle id, local path of its INT8 ONNX model) of the config's model."""
    from edgeq.core.errors import SpecError

    if "://" in cfg.store_url:
        raise SpecError(f"the benchmark reads bundles from a local store; {cfg.store_url} is not one")
    root = Path(cfg.store_url) / "bundles"
    manifests = [json.loads(p.read_text()) | {"_dir": p.parent, "_mtime": p.stat().st_mtime}
                 for p in root.glob("*/manifest.json")]
    manifests = [m for m in manifests if m["model"]["name"] == cfg.model.name and (bundle in (None, m["bundle_id"]))]
    if not manifests:
        raise SpecError(f"no published bundle of {cfg.model.name!r} in {root}" + (f" with id {bundle}" if bundle else "")
                        + ": run `edgeq convert` (or `edgeq demo`) with this config first")
    m = max(manifests, key=lambda m: m["_mtime"])
    int8 = [f for f in m["files"] if str(f).endswith(".onnx")]
    return m["bundle_id"], m["_dir"] / Path(str(int8[0])).name


def paired(fp32: Path, int8: Path, backend_name: str, feeds: dict, rounds: int, iters: int) -> dict:
    """FP32 and INT8 on one runtime, side by side: `edgeq.backends.paired_benchmark`, the timing the convert's
    speed verdict uses."""
    from edgeq.backends import get_backend, paired_benchmark
    from edgeq.core.specs import TargetSpec

    target = TargetSpec(name=backend_name, backend=backend_name, precision="fp32")
    backend = get_backend(backend_name)
    with backend.runner(fp32, target) as rf, backend.runner(int8, target) as ri:
        r = paired_benchmark(rf, ri, feeds, rounds=rounds, iters=iters)
        precision = rf.precision, ri.precision
    return {"fp32": r.a_ms, "int8": r.b_ms, "ratio": r.ratios, "precision": precision}


def main(argv: list[str] | None = None) -> None:
    quiet_environment()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--bundle", default=None, help="bundle id (default: the newest of the config's model)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=100, help="timed runs per model per round")
    args = ap.parse_args(argv)

    from edgeq.core.data import load_inputs, take
    from edgeq.core.platform import cpu_isa
    from edgeq.core.store import ArtifactStore
    from edgeq.tasks.config import load_prepared
    from edgeq.tasks.export import export_to_store

    cfg = load_prepared(args.config)
    bundle_id, int8 = newest_bundle_int8(cfg, args.bundle)
    fp32 = ArtifactStore(cfg.store_url).local_path(export_to_store(cfg).onnx)
    test, _ = load_inputs(cfg.data.test, cfg.model.inputs, cfg.data.preprocess)
    feeds = take(test, slice(0, 1))
    print(f"CPU: {cpu_isa()}")
    print(f"model {cfg.model.name}: FP32 {fp32.name} vs INT8 of {bundle_id}; batch 1, {args.rounds} alternating "
          f"rounds of {args.iters} runs; feeds {{{', '.join(f'{k}: {v.dtype}{list(v.shape)}' for k, v in feeds.items())}}}")

    def cell(v: list[float]) -> str:
        return f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"

    print("| runtime | FP32 ms | INT8 ms | FP32/INT8 (median, range) | ran as |")
    print("|---|---|---|---|---|")
    for b in ("onnxruntime", "openvino"):
        r = paired(fp32, int8, b, feeds, args.rounds, args.iters)
        print(f"| {b} | {cell(r['fp32'])} | {cell(r['int8'])} | {statistics.median(r['ratio']):.2f}x "
              f"({min(r['ratio']):.2f}-{max(r['ratio']):.2f}) | {r['precision'][0]} / {r['precision'][1]} |", flush=True)


if __name__ == "__main__":
    main()

"""Every bad input edgeq knows, in one table: each is refused with a specific message and changes nothing in
the store. The count is printed in the test summary (hook in tests/conftest.py).

Cases collected from tests/test_specs.py, tests/test_export.py, tests/test_store.py,
tests/backends/test_declared_and_bad_input.py, tests/calibration/test_calibration_bad_input.py,
tests/quantization/*, tests/test_validate.py, tests/calibration/test_content_identity.py, plus cases that only
this catalogue covers (marked NEW).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml

from edgeq.calibration.versions import load_version
from edgeq.core.errors import CalibrationError, ExportError, GateError, IntegrityError, ModelFileError, SpecError
from edgeq.core.specs import load_config
from edgeq.core.store import ArtifactStore
from tests.calibration.cal_helpers import tiny_pool, write_array_pool
from tests.reliability.rel_helpers import copy_store, fast_config, seed, snapshot


@dataclass
class Case:
    id: str
    action: Callable[[SimpleNamespace], object]
    error: type[BaseException]
    message: str  # a regex the error text must match
    setup: Callable[[SimpleNamespace], None] | None = None  # runs before the store snapshot
    # The calibration steps pass their outputs by reference, so a failure found only after reading the pool
    # (too few usable captures, all leaked) leaves those step outputs behind: new, intact, content-addressed
    # objects, never a record, a bundle, or a changed file.
    leaves_step_outputs: bool = False


# ------------------------------------------------------------------ building blocks
def config(c, edit: Callable[[dict], None] | None = None, **overrides) -> Path:
    path = fast_config(c.tmp / "cfg", c.demo, store=c.store, **overrides)
    if edit:
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(edit=None, **overrides):
    from edgeq.tasks.config import load_prepared

    return lambda c: load_prepared(config(c, edit, **overrides))


def export(edit=None, **overrides):
    def run(c):
        from edgeq.tasks.config import load_prepared
        from edgeq.tasks.export import export_to_store

        return export_to_store(load_prepared(config(c, edit, **overrides)))
    return run


def model(**fields):
    return lambda d: d["model"].update(fields)


def raw_config(text: str):
    def run(c):
        from edgeq.core.specs import load_config

        p = c.tmp / "bad.yaml"
        p.write_text(text)
        return load_config(p)
    return run


def calibrate(captures: Callable[[SimpleNamespace], dict], override: str | None = "test"):
    def run(c):
        from edgeq.tasks.calibration import build_calibration_candidate
        from edgeq.tasks.config import load_prepared

        caps = {k: str(v) if isinstance(v, Path) else v for k, v in captures(c).items()}
        cfg = load_prepared(config(c, lambda d: d["data"].update(captures=caps)))
        return build_calibration_candidate(cfg, override_reason=override)
    return run


def pool(n: int, strata=("lighting", "camera"), mutate=None):
    def make(c):
        cap = tiny_pool(c.tmp / "pool", c.demo, n)
        if mutate:
            mutate(cap, pd.read_csv(cap / "metadata.csv"))
        return {"path": cap, "metadata": cap / "metadata.csv", "strata": list(strata)}
    return make


def array_pool(x_fn):
    def make(c):
        path, meta = write_array_pool(c.tmp / "arr", x_fn(c))
        return {"path": path, "metadata": meta}
    return make


def escaping_metadata(cap: Path, meta: pd.DataFrame) -> None:
    (cap.parent / "outside.png").write_bytes((cap / meta["path"][0]).read_bytes())
    meta.loc[2, "path"] = "../outside.png"
    meta.to_csv(cap / "metadata.csv", index=False)


def missing_file(cap: Path, meta: pd.DataFrame) -> None:
    (cap / meta["path"][3]).unlink()


def corrupt_all(cap: Path, meta: pd.DataFrame) -> None:
    for p in meta["path"]:
        (cap / p).write_bytes(b"garbage")


def check(target: dict, onnx: Callable[[SimpleNamespace], Path] | None = None):
    """The compile-check stage for one required target, then its gate (what the pipeline runs)."""
    def run(c):
        from edgeq.backends import get_backend
        from edgeq.core.specs import TargetSpec
        from edgeq.tasks.compile_check import CompileMatrix, gate_required_targets

        t = TargetSpec(**target)
        path = onnx(c) if onnx else c.fp32_path
        report = get_backend(t.backend).check_compiles(path, t, warmup=0, iters=1)
        gate_required_targets(CompileMatrix(model="digits-cnn", onnx_sha256="0" * 64, reports=[report]))
    return run


def truncated_onnx(c) -> Path:
    bad = c.tmp / "truncated.onnx"
    bad.write_bytes(c.fp32_path.read_bytes()[:200])
    return bad


def external_data_outside(c) -> Path:
    """An ONNX file whose initializer's external data is '../secret.bin' (a file next to, not inside, its folder)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = c.tmp / "model"
    folder.mkdir()
    (c.tmp / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(m, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    m = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../secret.bin"
    onnx.save_model(m, str(folder / "evil.onnx"))
    return folder / "evil.onnx"


def quantize(version: str | Callable = None, edit=None):
    def run(c):
        from edgeq.tasks.config import load_prepared
        from edgeq.tasks.quantize import quantize_to_store

        cfg = load_prepared(config(c, edit))
        return quantize_to_store(cfg, c.fp32, version if isinstance(version, str) else c.version, c.opset)
    return run


class _Evil:
    marker: Path = Path("/nonexistent")

    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def evil_pickle(c):
    from edgeq.tasks.config import load_prepared
    from edgeq.tasks.export import export_to_store

    _Evil.marker = c.tmp / "pwned"
    weights = c.tmp / "evil.pt"
    with open(weights, "wb") as f:
        pickle.dump({"stem.0.weight": _Evil()}, f)
    try:
        export_to_store(load_prepared(config(c, model(weights=str(weights)))))
    finally:
        assert not _Evil.marker.exists(), "the pickle's code ran"


def empty_split(c):
    from edgeq.tasks.config import load_prepared
    from edgeq.tasks.export import export_to_store

    z = np.load(c.demo / "test.npz")
    empty = c.tmp / "empty.npz"
    np.savez(empty, x=z["x"][:0], y=z["y"][:0])
    return export_to_store(load_prepared(config(c, lambda d: d["data"].update(test={"kind": "arrays",
                                                                                    "path": str(empty)}))))


def token_config_file(c, change_test: Callable[[dict], dict] | None = None, captures: dict | None = None) -> Path:
    """A config for the two-input token encoder (tests/multi_input_models.py) on the case's store."""
    from tests.multi_input_models import TinyEncoder, save_weights, token_config, write_token_splits

    paths = write_token_splits(c.tmp / "tokens", sizes={"train": 20, "validation": 20, "test": 20, "pool": 20})
    if change_test:
        z = dict(np.load(paths["test"]))
        np.savez(paths["test"], **change_test(z))
    weights = save_weights(TinyEncoder(), c.tmp / "tokens" / "w.safetensors")
    data = token_config(c.tmp, weights, paths, store=str(c.store))
    if captures is not None:
        data["data"]["captures"] = {"path": str(paths["captures"]), "metadata": str(paths["metadata"]),
                                    "min_size": 1, **captures}
    path = c.tmp / "tokens.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def token_export(change: Callable[[dict], dict]):
    """Export of the two-input token encoder whose test split is `change`d."""
    def run(c):
        from edgeq.tasks.config import load_prepared
        from edgeq.tasks.export import export_to_store

        return export_to_store(load_prepared(token_config_file(c, change)))
    return run


def token_captures_lacking_the_mask(c):
    from edgeq.tasks.calibration import build_calibration_candidate
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(token_config_file(c, captures={}))
    z = dict(np.load(cfg.data.captures.path))
    np.savez(cfg.data.captures.path, input_ids=z["input_ids"])
    return build_calibration_candidate(cfg)


def _ragged(z: dict) -> dict:
    rows = [r[: int(m.sum())] for r, m in zip(z["input_ids"], z["attention_mask"])]
    ragged = np.empty(len(rows), dtype=object)
    ragged[:] = rows
    return {**z, "input_ids": ragged}


def tampered_read(c):
    from edgeq.core.store import ArtifactStore

    return ArtifactStore(c.store).read_bytes(c.fp32)


def tamper(c):
    data = bytearray(c.fp32_path.read_bytes())
    data[-5] ^= 0xFF
    os.chmod(c.fp32_path, 0o644)
    c.fp32_path.write_bytes(bytes(data))


def cli(*args, config_text: str | None = None):
    def run(c):
        from typer.testing import CliRunner

        from edgeq.cli import app

        subst = {"CONFIG": lambda: str(config(c)), "VERSION": lambda: c.cand_version}
        argv = [subst[a]() if a in subst else a for a in args]
        if config_text is not None:
            (c.tmp / "bad.yaml").write_text(config_text)
            argv = [a if a != "BAD" else str(c.tmp / "bad.yaml") for a in argv]
        res = CliRunner().invoke(app, argv)
        if res.exit_code != 0:
            raise SystemExit(f"exit {res.exit_code}: {res.output}")
        return res
    return run


def publish_failed(c):
    from edgeq.publish import publish_bundle
    from edgeq.tasks.config import load_prepared

    return publish_bundle(load_prepared(config(c)), c.fp32_path, {"model": {"name": "x"}}, {}, gates_passed=False)


def device_target(name):
    def run(c):
        from edgeq.tasks.config import load_prepared
        from edgeq.validation import pick_device_target

        return pick_device_target(load_prepared(config(c, validation={"device_target": name, "latency_iters": 10})))
    return run


def validate_with_test(form: str, overlap: int = 5):
    """The validate stage with data.test = 40 real test digits plus `overlap` calibration captures, stored as `form`.

    The disjointness gate runs before any model does, so the FP32 model stands in the INT8 slot.
    """
    def run(c):
        from edgeq.tasks.config import load_prepared
        from edgeq.tasks.validate import validate_to_store

        with np.load(c.demo / "test.npz") as z, np.load(c.demo / "pool.npz") as p:
            x = np.concatenate([z["x"][:40], p["x"][:overlap]])
            y = np.concatenate([z["y"][:40], p["y"][:overlap]])
        test = {"kind": "arrays", "path": str(c.tmp / "test.npz")}
        if form.startswith("float32"):
            x = (x / 255.0).astype(np.float32)
            test["preprocessed"] = form == "float32-preprocessed"
        elif form == "nhwc":
            x = x.transpose(0, 2, 3, 1)
        elif form == "nhwc-3-channels":
            x = np.repeat(x, 3, axis=1).transpose(0, 2, 3, 1)
        np.savez(c.tmp / "test.npz", x=x, y=y)
        cfg = load_prepared(config(c, lambda d: d["data"].update(test=test)))
        return validate_to_store(cfg, c.fp32, c.fp32, c.version, c.opset)
    return run


def validate_on(name):
    """The four-way validation stage with `name` as the device target (what convert runs after quantizing)."""
    def run(c):
        from edgeq.tasks.config import load_prepared
        from edgeq.tasks.validate import validate_to_store

        cfg = load_prepared(config(c, validation={"device_target": name, "latency_iters": 10}))
        return validate_to_store(cfg, c.fp32, c.fp32, c.version, c.opset)
    return run


def required(target: str):
    """Config edit: make a target required."""
    return lambda d: next(t for t in d["targets"] if t["name"] == target).update(required=True)


def rejected_candidate(c):
    """Setup: a small candidate version in the case's store, rejected by bob."""
    from edgeq.calibration.versions import record_decision
    from edgeq.core.store import ArtifactStore

    v = calibrate(pool(20))(c).version
    record_decision(ArtifactStore(c.store), v.version, approve=False, reviewer="bob")
    c.cand_version = v.version


def hand_edited_approval(c):
    """Setup: the approved version's record edited by hand (another reviewer's name written in)."""
    import json

    path = Path(ArtifactStore(c.store).record_location(f"calibration/{c.version}.json"))
    rec = json.loads(path.read_text())
    rec["decision"]["reviewer"] = "mallory"
    path.write_text(json.dumps(rec))


MODERN = [{"name": "ort-cpu", "backend": "onnxruntime"}, {"name": "openvino-cpu", "backend": "openvino"}]

CASES = [
    # --- config files (tests/test_specs.py)
    Case("config-unknown-field", load(model(wieghts="x.safetensors")), SpecError, r"model.wieghts: unknown field"),
    Case("config-opset-not-a-number", load(lambda d: d["targets"][0].update(max_opset="eighteen")), SpecError,
         r"targets.0.max_opset"),
    Case("config-factory-not-import-path", load(model(factory="not an import path")), SpecError,
         r"model.factory: .*is not an import path of the form 'package.module:function'"),
    Case("config-zero-dimension", load(lambda d: d["model"]["inputs"][0].update(shape=["batch", 1, 0, 8])),
         SpecError, r"model.inputs.0.shape: .*static dimensions must be positive, got 0"),
    Case("config-dynamic-dim-without-size", load(lambda d: d["model"]["inputs"][0].update(shape=["seq", 1, 8, 8])),
         SpecError, r"dynamic dimension 'seq' with no size in example_dims"),
    Case("config-parity-samples-too-few", load(lambda d: d["thresholds"].update(parity_samples=5)), SpecError,
         r"thresholds.parity_samples: Input should be greater than or equal to 10"),
    Case("config-no-targets", load(lambda d: d.pop("targets")), SpecError, r"targets: Field required"),
    Case("config-image-folder-without-labels", load(lambda d: d["data"]["test"].update(kind="image_folder")),
         SpecError, r"needs 'labels'"),
    Case("config-duplicate-target-names", load(lambda d: d["targets"].append(dict(d["targets"][0]))), SpecError,
         r"target names must be unique"),
    Case("config-declared-without-profile", load(lambda d: d["targets"][2].pop("profile")), SpecError,
         r"target 'hailo8-declared': backend 'declared' needs 'profile'"),
    Case("config-not-yaml", raw_config("model: [unclosed\n  - x: {"), SpecError, r"bad.yaml is not valid YAML"),
    Case("config-yaml-not-a-mapping", raw_config("- just\n- a list\n"), SpecError, r"must hold a YAML mapping"),
    Case("config-missing-file", lambda c: load_config(c.tmp / "nope.yaml"),
         SpecError, r"config file .*nope.yaml does not exist"),
    Case("config-metric-import-fails (NEW)", load(model(metric="no_such_pkg.metrics:f1")), SpecError,
         r"model.metric 'no_such_pkg.metrics:f1': cannot import 'no_such_pkg.metrics'.*ModuleNotFoundError"),
    Case("config-metric-attribute-missing (NEW)", load(model(metric="edgeq.core.metrics:f1_score")), SpecError,
         r"model.metric 'edgeq.core.metrics:f1_score': 'edgeq.core.metrics' has no attribute 'f1_score'"),
    Case("config-metric-not-callable (NEW)", load(model(metric="edgeq:PIPELINE_VERSION")), SpecError,
         r"model.metric 'edgeq:PIPELINE_VERSION': metric edgeq:PIPELINE_VERSION is not callable"),
    Case("cli-convert-config-not-yaml (NEW)", cli("convert", "BAD", config_text="targets: [oops"), SystemExit,
         r"exit 1: .*bad.yaml is not valid YAML"),
    Case("validation-device-target-unknown", device_target("board"), SpecError,
         r"validation.device_target 'board' is not one of the targets \(ort-cpu, openvino-cpu, hailo8-declared\)"),
    Case("validation-device-target-is-onnx-runtime (NEW)", validate_on("ort-cpu"), SpecError,
         r"validation.device_target: device target 'ort-cpu' runs the INT8 model on the runtime and device of the "
         r"ONNX INT8 row .*no independent device check would run.*require_independent_device: false"),
    # --- export (tests/test_export.py)
    Case("export-missing-weights", export(model(weights="/nonexistent/nope.safetensors")), SpecError,
         r"weights file .*nope.safetensors does not exist"),
    Case("export-weights-do-not-match-factory", export(model(kwargs={"width": 8, "num_classes": 10})), SpecError,
         r"do not match the model .*stem.0.weight: file \(16, 1, 3, 3\) vs model \(8, 1, 3, 3\)"),
    Case("security-pickle-with-code", evil_pickle, SpecError,
         r"refusing weights file .*evil.pt.*pickle that carries code"),
    Case("export-input-shape-data-does-not-fit",
         export(model(inputs=[{"name": "image", "shape": ["batch", 1, 16, 16]}])), SpecError,
         r"input 'image' expects samples of shape \[1, 16, 16\] but the data has \[1, 8, 8\]"),
    Case("export-traced-tensor-control-flow",
         export(model(factory="tests.edgeq_testmodels:tensor_if", exporter="torchscript")), ExportError,
         r"tracing recorded only the branch"),
    Case("export-unknown-target-backend (NEW)", export(targets=[{"name": "phone", "backend": "tflite"}]), SpecError,
         r"target 'phone': unknown backend 'tflite'; known backends: command, declared, onnxruntime, openvino, "
         r"tensorrt"),
    Case("export-opset-below-what-the-model-needs (NEW)",
         export(model(factory="tests.reliability.rel_models:einsum_digits"),
                targets=[{"name": "old-npu", "backend": "onnxruntime", "max_opset": 11}]), ExportError,
         r"op aten::einsum needs ONNX opset >= 12, but the export opset is 11 \(lowest maximum opset among "
         r"targets: old-npu supports up to 11\): raise that target's max_opset"),
    Case("export-empty-test-split (NEW)", empty_split, SpecError, r"data split from .*empty.npz is empty"),
    Case("export-nan-in-one-output (NEW)",
         export(model(factory="tests.edgeq_testmodels:nan_aux", outputs=["logits", "aux"])), GateError,
         r"dynamic-shape probe: input 'image' axis 0 \('batch'\) at size 1: output 'aux': PyTorch has 1 non-finite "
         r"value\(s\) \(NaN/Inf\)"),
    # --- compile check (tests/backends/test_declared_and_bad_input.py)
    Case("export-token-split-lacking-an-input (NEW)",
         token_export(lambda z: {k: v for k, v in z.items() if k != "attention_mask"}), SpecError,
         r"array file .*test.npz has no array for model input\(s\) \['attention_mask'\]"),
    Case("export-token-ids-stored-as-floats (NEW)",
         token_export(lambda z: {**z, "input_ids": z["input_ids"].astype(np.float32)}), SpecError,
         r"input 'input_ids' is declared int64 but the data holds float32 values"),
    Case("export-token-inputs-disagree-on-seq (NEW)",
         token_export(lambda z: {**z, "attention_mask": z["attention_mask"][:, :8]}), SpecError,
         r"inputs that share the dynamic axis 'seq' disagree on its size: \{'input_ids': 12, 'attention_mask': 8\}"),
    Case("export-token-ragged-ids (NEW)", token_export(_ragged), SpecError,
         r"array file .*test.npz holds a ragged or object array"),
    Case("export-token-all-zero-masks (NEW)",
         token_export(lambda z: {**z, "attention_mask": np.zeros_like(z["attention_mask"])}), GateError,
         r"parity gate: the parity samples are degenerate .* output 'embedding' is the same for all 16 samples"),
    Case("calibration-token-captures-lacking-an-input (NEW)", token_captures_lacking_the_mask, SpecError,
         r"capture array file .* has no array for model input\(s\) \['attention_mask'\]"),
    Case("check-truncated-onnx", check({"name": "t", "backend": "onnxruntime"}, truncated_onnx), ModelFileError,
         r"truncated.onnx is not a readable ONNX model \(truncated or corrupt file\?\)"),
    Case("check-onnx-external-data-outside-its-folder (NEW)",
         check({"name": "t", "backend": "onnxruntime"}, external_data_outside), ModelFileError,
         r"evil.onnx: initializer 'W' keeps its data at '../secret.bin', outside the model's folder"),
    Case("check-opset-above-target-max", check({"name": "old-rt", "backend": "openvino", "max_opset": 13}),
         GateError, r"old-rt \(openvino, failed\): model opset 17 is above target 'old-rt''s maximum 13"),
    Case("check-op-outside-declared-profile",
         check({"name": "npu", "backend": "declared", "profile": "hailo8-example", "layout": "NHWC"}), GateError,
         r"npu \(declared, failed\): .*NHWC"),
    Case("check-device-command-not-found",
         check({"name": "board", "backend": "command", "command": ["/nonexistent/run-on-board"]}), GateError,
         r"board \(command, failed\): .*device command '/nonexistent/run-on-board' not found"),
    # --- calibration (tests/calibration/test_calibration_bad_input.py)
    Case("calibration-pool-below-minimum", calibrate(pool(40), override=None), CalibrationError,
         r"only 40 usable captures .* below the minimum of 256.*--override-reason", leaves_step_outputs=True),
    Case("calibration-strata-column-missing", calibrate(pool(10, strata=("lighting", "product"))), SpecError,
         r"lacks strata column 'product' \(has \['capture_id', 'path'"),
    Case("calibration-metadata-row-missing-file", calibrate(pool(10, mutate=missing_file)), SpecError,
         r"1 row\(s\) point to files missing .*row 3"),
    Case("calibration-metadata-path-escapes-capture-folder (NEW)", calibrate(pool(10, mutate=escaping_metadata)),
         SpecError, r"path '../outside.png' escapes its folder .*pool/captures"),
    Case("calibration-only-corrupt-images", calibrate(pool(3, mutate=corrupt_all)), CalibrationError,
         r"none of the 3 captures .* is usable: .*cannot be decoded"),
    Case("calibration-all-nan-arrays", calibrate(array_pool(lambda c: np.full((4, 1, 8, 8), np.nan, np.float32))),
         CalibrationError, r"none of the 4 captures .* a0: 64 NaN/Inf value\(s\)"),
    Case("calibration-pool-all-in-training-set",
         calibrate(array_pool(lambda c: np.load(c.demo / "train.npz")["x"][:30])), CalibrationError,
         r"all 30 usable captures .* already in the training set \(30\)", leaves_step_outputs=True),
    Case("calibration-review-unknown-version",
         cli("calibration", "review", "cal-0000000000000000", "--approve", "--reviewer", "ann", "-c", "CONFIG"),
         SystemExit, r"calibration version 'cal-0000000000000000' not found"),
    Case("calibration-version-id-with-a-path", lambda c: load_version(
        ArtifactStore(c.store), "../../etc/passwd"), CalibrationError,
         r"'../../etc/passwd' is not a calibration version id"),
    Case("calibration-approve-a-rejected-version",
         cli("calibration", "review", "VERSION", "--approve", "--reviewer", "ann", "-c", "CONFIG"), SystemExit,
         r"was already rejected by bob .*a decision is final", setup=rejected_candidate),
    # --- quantization (tests/quantization/*)
    Case("quantize-unknown-calibration-version", quantize("cal-0000000000000000"), CalibrationError,
         r"calibration version 'cal-0000000000000000' not found in store"),
    Case("quantize-hand-edited-approval-record", quantize(), IntegrityError,
         r"calibration record .*calibration/cal-\w+\.json holds a decision \(approved by mallory\) whose seal does "
         r"not match .*edited by hand", setup=hand_edited_approval),
    Case("quantize-keep-fp32-layer-not-in-model",
         quantize(edit=lambda d: d["quantization"].update(keep_fp32_nodes=["no_such_conv"])), SpecError,
         r"layer\(s\) to keep in FP32 not found in the model: no_such_conv"),
    Case("quantize-required-declared-target-without-qdq-ops (NEW)",
         quantize(edit=lambda d: (required("hailo8-declared")(d), d["quantization"].update(max_sensitive_fp32=0))),
         GateError, r"no INT8 attempt can ship: required target 'hailo8-declared' cannot take the INT8 models "
                    r"\(failed: op\(s\) outside profile 'hailo8-example' of target 'hailo8-declared': "
                    r"(QuantizeLinear|DequantizeLinear)"),
    Case("quantize-qat-without-training-data",
         quantize(edit=lambda d: (d["quantization"].update(mode="qat"), d["data"].pop("train"))), SpecError,
         r"QAT (was requested but the config has no|needs) training data: set data.train"),
    # --- validation (tests/test_validate.py, tests/calibration/test_content_identity.py)
    Case("validate-float32-test-split-overlapping-captures", validate_with_test("float32-preprocessed"),
         GateError, r"the test split shares 5 of 45 samples with calibration version cal-\w+ \(the same model "
                    r"input after data.preprocess\)"),
    Case("validate-nhwc-test-split-overlapping-captures", validate_with_test("nhwc"), GateError,
         r"the test split shares 5 of 45 samples with calibration version cal-\w+"),
    Case("validate-float32-test-split-not-marked-preprocessed", validate_with_test("float32-unmarked"),
         SpecError, r"data.test holds float32 samples with fractional values \(45 of 45 samples\) but is not "
                    r"marked `preprocessed: true`"),
    Case("validate-test-split-no-layout-change-fits", validate_with_test("nhwc-3-channels"), SpecError,
         r"data.test holds samples of shape \[8, 8, 3\] but model input 'image' takes \[1, 8, 8\] .*cannot be "
         r"put in one form"),
    # --- store and publish (tests/test_store.py, tests/test_validate.py)
    Case("store-tampered-artifact", tampered_read, IntegrityError,
         r"artifact digits-cnn.onnx at .* was changed after it was written: .*refusing to use it", setup=tamper),
    Case("store-artifact-name-escapes", lambda c: ArtifactStore(c.store).put_bytes(
        b"x", "../evil"), ValueError, r"artifact name must be a plain file name, got '../evil'"),
    Case("publish-after-a-failed-gate", publish_failed, GateError, r"do not ship: a gate failed, nothing was published"),
]


@pytest.fixture(scope="module")
def base(demo_root, tmp_path_factory):
    """A store with the approved calibration version and the demo's FP32 export (copied per case)."""
    from edgeq.tasks.config import load_prepared
    from edgeq.tasks.export import export_to_store

    seed_store, version = seed(demo_root)
    folder = tmp_path_factory.mktemp("catalogue-base")
    store = copy_store(seed_store, folder / "store")
    exported = export_to_store(load_prepared(fast_config(folder / "cfg", demo_root, store=store)))
    return SimpleNamespace(store=store, version=version, fp32=exported.onnx, opset=exported.report.opset)


@pytest.mark.parametrize("case", CASES, ids=[c.id.replace(" (NEW)", "") for c in CASES])
def test_bad_input_is_refused_with_a_specific_error(case, base, demo_root, tmp_path, request):
    from edgeq.core.store import ArtifactStore

    store = copy_store(base.store, tmp_path / "store")
    fp32 = base.fp32.model_copy(update={"uri": base.fp32.uri.replace(str(base.store), str(store))})
    c = SimpleNamespace(tmp=tmp_path, demo=demo_root, store=store, version=base.version, fp32=fp32,
                        fp32_path=Path(fp32.uri.removeprefix("file://")), opset=base.opset)
    assert ArtifactStore(store).local_path(fp32) == c.fp32_path
    if case.id.startswith("cli-convert"):
        request.getfixturevalue("prefect_server")
    if case.setup:
        case.setup(c)
    before = snapshot(store)
    with pytest.raises(case.error) as err:
        case.action(c)
    text = " ".join(str(err.value).split())
    assert re.search(case.message, text), f"{case.id}: {text[:1500]}"
    after = snapshot(store)
    if case.leaves_step_outputs:
        added = {k: v for k, v in after.items() if k not in before}
        assert {k: v for k, v in after.items() if k in before} == before, f"{case.id} changed a file in the store"
        assert all(k.startswith("objects/") and k.split("/")[2] == v for k, v in added.items()), added
    else:
        assert after == before, f"{case.id} changed the store"

"""The export stage through Prefect: content-keyed cache hits across runs, misses on changed weights, the CLI."""

import shutil

import yaml
from prefect import flow
from typer.testing import CliRunner

from edgeq.tasks.config import load_prepared
from edgeq.tasks.export import export_task
from tests.conftest import SMALL_WEIGHTS, write_config


@flow
def _export_states(cfg):
    return export_task(cfg, return_state=True)


def test_unchanged_inputs_hit_the_cache_and_changed_weights_miss(prefect_server, tmp_path, demo_root):
    path = write_config(tmp_path, demo_root)
    cfg = load_prepared(path)
    first = _export_states(cfg)
    second = _export_states(load_prepared(path))
    assert first.name == "Completed" and second.name == "Cached"
    assert second.result().onnx == first.result().onnx

    # Same weights copied to another file: same content, still a hit.
    copy = tmp_path / "copy.safetensors"
    shutil.copy(demo_root / SMALL_WEIGHTS, copy)
    data = yaml.safe_load(path.read_text())
    data["model"]["weights"] = str(copy)
    path.write_text(yaml.safe_dump(data))
    assert _export_states(load_prepared(path)).name == "Cached"

    # One changed byte in the weights file: a miss, and a different ONNX model.
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy))
    state["head.bias"][0] += 0.5
    save_file(state, str(copy))
    third = _export_states(load_prepared(path))
    assert third.name == "Completed"
    assert third.result().onnx.sha256 != first.result().onnx.sha256


def test_cli_export_prints_the_report_and_fails_clearly(prefect_server, tmp_path, demo_root):
    from edgeq.cli import app

    ok = CliRunner().invoke(app, ["export", str(write_config(tmp_path / "ok", demo_root))])
    assert ok.exit_code == 0, ok.output
    assert "logits" in ok.output and "pass" in ok.output and "image[0]=3: ok" in ok.output

    bad = write_config(tmp_path / "bad", demo_root)
    data = yaml.safe_load(bad.read_text())
    data["model"]["weights"] = str(tmp_path / "missing.safetensors")
    bad.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["export", str(bad)])
    assert res.exit_code == 1
    assert "missing.safetensors does not exist" in res.output

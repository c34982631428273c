"""The command line as a user sees it: expected errors as one message, tables that do not wrap in a pipe, and a
store named without a config."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.reliability.rel_helpers import FAST_TARGETS, child_env, fast_config


@pytest.fixture(scope="module")
def configs(tmp_path_factory, demo_root):
    """A passing config and one whose required NPU target cannot take the model's NCHW layout, on one store (the
    export is computed once and is a cache hit for the second)."""
    folder = tmp_path_factory.mktemp("cli")
    store = folder / "store"
    ok = fast_config(folder / "ok", demo_root, store=store)
    targets = [dict(t) for t in FAST_TARGETS]
    targets[2].update(layout="NHWC", required=True)
    bad = fast_config(folder / "bad", demo_root, store=store, targets=targets)
    return ok, bad


def edgeq(*args: str) -> subprocess.CompletedProcess:
    """`edgeq ARGS` with its output piped, as in a script or CI log, against the session's Prefect API."""
    env = child_env()
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # what a user sees by default
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)


def test_piped_check_prints_its_table_unwrapped(prefect_server, configs):
    ok, _ = configs
    out = edgeq("check", str(ok), "--iters", "5", "--warmup", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = [ln for ln in lines if ln.split()[:2] == ["target", "backend"]]
    assert header and all(h in header[0] for h in ("status", "required", "opset", "precision", "layout", "batch")), \
        out.stdout
    assert any(ln.split()[:3] == ["openvino-cpu", "openvino", "compiled"] for ln in lines), out.stdout
    assert "See https://www.prefect.io" not in out.stdout + out.stderr


def test_expected_gate_failure_is_one_message_without_traceback(prefect_server, configs):
    _, bad = configs
    out = edgeq("check", str(bad), "--iters", "5", "--warmup", "1")
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "error: 1 required target(s) cannot take model digits-cnn" in " ".join(out.stderr.split()), out.stderr
    assert "hailo8-declared (declared, failed)" in out.stderr
    for noise in ("Traceback", "Encountered exception during execution", "Finished in state Failed",
                  "Still processing items"):
        assert noise not in text, f"{noise!r} printed for an expected error:\n{text[-4000:]}"

    verbose = edgeq("--verbose", "check", str(bad), "--iters", "5", "--warmup", "1")
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "CompileCheckFailed" in verbose.stderr


def test_calibration_list_names_its_store_without_a_config(tmp_path, monkeypatch):
    from edgeq.cli import app

    monkeypatch.chdir(tmp_path)  # no digits-demo.yaml here
    monkeypatch.delenv("EDGEQ_STORE", raising=False)
    res = CliRunner().invoke(app, ["calibration", "list"])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "--store" in text and "EDGEQ_STORE" in text and "--config" in text, text

    res = CliRunner().invoke(app, ["calibration", "list"], env={"EDGEQ_STORE": str(tmp_path / "store")})
    assert res.exit_code == 0, res.output
    assert "no calibration versions yet" in res.output

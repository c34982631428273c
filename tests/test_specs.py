from pathlib import Path

import pytest
import yaml

from edgeq.core.errors import SpecError
from edgeq.core.specs import load_config
from tests.conftest import SMALL_WEIGHTS, write_config


def test_demo_config_loads_with_paths_relative_to_the_file(demo_config_path):
    cfg = load_config(demo_config_path)
    assert cfg.model.inputs[0].dynamic_axes == {0: "batch"}
    assert cfg.model.weights.is_absolute() and cfg.model.weights.name == SMALL_WEIGHTS
    assert cfg.thresholds.export_atol == 1e-5


def _edit(path: Path, fn) -> Path:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d["model"].update(wieghts="x.safetensors"), "model.wieghts: unknown field"),
        (lambda d: d["targets"][0].update(max_opset="eighteen"), "targets.0.max_opset"),
        (lambda d: d["model"].update(factory="not an import path"), "model.factory"),
        (lambda d: d["model"]["inputs"][0].update(shape=["batch", 1, 0, 8]), "model.inputs.0.shape"),
        (lambda d: d["model"]["inputs"][0].update(shape=["seq", 1, 8, 8]), "dynamic dimension 'seq' with no size"),
        (lambda d: d["thresholds"].update(parity_samples=5), "thresholds.parity_samples"),
        (lambda d: d.pop("targets"), "targets: Field required"),
        (lambda d: d["data"]["test"].update(kind="image_folder"), "needs 'labels'"),
        (lambda d: d.update(quantization={"target_engines": {"openvino-gpu": "nncf"}}),
         "quantization.target_engines names ['openvino-gpu'], which are not targets"),
        (lambda d: d.update(quantization={"target_engines": {"ort-cpu": "nncf"}}),
         "pins the deployment target 'ort-cpu'"),
        (lambda d: d.update(quantization={"target_forms": "per-target"}), "quantization.target_forms"),
        (lambda d: d["targets"][0].update(name="../escape"), "targets.0.name"),
    ],
)
def test_bad_yaml_names_the_field(tmp_path, demo_root, edit, expected):
    path = _edit(write_config(tmp_path, demo_root), edit)
    with pytest.raises(SpecError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n  - x: {")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="must hold a YAML mapping"):
        load_config(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")

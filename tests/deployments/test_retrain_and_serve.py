"""retrain_to_deploy's plain training step, its errors, and deployments/serve.py's reading of prefect.yaml."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO, write_config


def wide_trainer(config, width: int = 32):
    """A trainer that returns a model the config's factory cannot load (wrong width)."""
    from edgeq.demo import digits_net

    return digits_net(width=width)


@pytest.fixture
def cfg(tmp_path, demo_root):
    from edgeq.tasks.config import load_prepared

    return load_prepared(write_config(tmp_path, demo_root))


def test_training_step_stores_safetensors_that_load_into_the_model(cfg):
    from safetensors.torch import load_file

    from edgeq.core.store import ArtifactStore, sha256_file
    from edgeq.demo import digits_net
    from edgeq.flows.retrain import retrained_config, train_to_store

    result = train_to_store(cfg, {"epochs": 2})
    path = ArtifactStore(cfg.store_url).local_path(result.weights)
    assert path.name == "digits-cnn.safetensors" and sha256_file(path) == result.weights.sha256
    model = digits_net(**cfg.model.kwargs)
    model.load_state_dict(load_file(str(path)))  # strict: every tensor of the model, nothing else
    assert result.weights.sha256 != sha256_file(cfg.model.weights)  # 2 epochs, not the demo's 40

    from edgeq.core.specs import EdgeqConfig

    inline = EdgeqConfig.model_validate(retrained_config(cfg, path))
    assert inline.model.weights == path and inline.store_url == cfg.store_url and inline.prepare is None


def test_trainer_returning_weights_of_another_shape_names_the_mismatch(tmp_path, demo_root):
    from edgeq.core.errors import SpecError
    from edgeq.flows.retrain import train_to_store
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(write_config(tmp_path, demo_root,
                                     training={"entrypoint": f"{__name__}:wide_trainer"}))
    with pytest.raises(SpecError, match=r"do not fit model.factory edgeq.demo:digits_net.*other shape \['blocks.0.bn1.bias \(32,\) != \(16,\)"):
        train_to_store(cfg, {})


def test_trainer_called_with_arguments_it_does_not_take_is_a_spec_error(cfg):
    from edgeq.core.errors import SpecError
    from edgeq.flows.retrain import train_to_store

    with pytest.raises(SpecError, match=r"train_digits_demo cannot be called .*learning_rate"):
        train_to_store(cfg, {"learning_rate": 0.1})


def test_serve_builds_the_prefect_yaml_deployments():
    spec = importlib.util.spec_from_file_location("edgeq_serve", REPO / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    deps = {d.name: d for d in serve.runner_deployments()}
    assert set(deps) == {"convert-model", "build-calibration-set", "retrain-to-deploy"}
    assert all(d.full_name == f"{name}/{name}" for name, d in deps.items())  # each named after its flow
    assert [s.schedule.cron for s in deps["retrain-to-deploy"].schedules] == ["0 3 * * 1"]
    assert deps["convert-model"].concurrency_limit == 1
    assert deps["convert-model"].concurrency_options.collision_strategy.value == "ENQUEUE"
    trigger = deps["convert-model"].triggers[0]
    assert trigger.expect == {"edgeq.calibration.approved"}
    assert trigger.parameters["params"]["calibration"] == "{{ event.payload.version }}"

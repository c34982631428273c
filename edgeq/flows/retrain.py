"""Flow `retrain_to_deploy`: the user's training entrypoint -> new weights in the store -> `convert_model`.

Success means a published bundle built from the new weights; anything short of that fails the run.
Training is a cached task keyed on the trainer's code, its arguments, the training data and the model
spec, so a scheduled run with nothing new is cache hits end to end and publishes the same bundle.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from edgeq.core.errors import EdgeqError, SpecError
from edgeq.core.specs import EdgeqConfig, TrainingSpec, load_object
from edgeq.core.store import ArtifactRef, ArtifactStore
from edgeq.flows.convert import ConvertParams, convert_model
from edgeq.publish import read_manifest
from edgeq.tasks.caching import code_fingerprint, content_key, on_store, retry_transient, split_fingerprint
from edgeq.tasks.config import load_prepared


class RetrainParams(BaseModel):
    config: str = Field("digits-demo.yaml", description="path of the edgeq YAML config (on the worker)")
    train_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the config's training.kwargs for this run, e.g. {\"epochs\": 10}")
    retrain: bool = Field(False, description="train again even when code, arguments and data are unchanged")
    calibration: str = Field("latest", description="approved calibration version id, or 'latest' approved for the model")
    mode: Literal["auto", "ptq", "qat"] | None = Field(None, description="quantization mode (default: the config's)")
    max_drop: float | None = Field(None, ge=0, le=1, description="INT8 SLA: max metric drop vs FP32 (default: the config's)")


class TrainResult(BaseModel):
    weights: ArtifactRef
    entrypoint: str
    kwargs: dict[str, Any]
    seconds: float


class RetrainResult(BaseModel):
    weights: ArtifactRef
    bundle_id: str
    bundle_uri: str
    calibration_version: str
    train_seconds: float
    message: str


# -- training as a plain function, then a cached task ----------------------------------------------------

def training_spec(cfg: EdgeqConfig) -> TrainingSpec:
    return cfg.training or TrainingSpec()


def _state_dict(out: Any, entrypoint: str) -> dict:
    import torch

    if isinstance(out, torch.nn.Module):
        return out.state_dict()
    if isinstance(out, dict) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        return out
    raise SpecError(f"training entrypoint {entrypoint} must return a torch.nn.Module or a state_dict "
                    f"(name -> tensor), got {type(out).__name__}")


def train_to_store(cfg: EdgeqConfig, kwargs: dict[str, Any]) -> TrainResult:
    """Call the training entrypoint, check the weights fit the config's model, store them as safetensors."""
    from safetensors.torch import save_file


    spec = training_spec(cfg)
    fn = load_object(spec.entrypoint)
    try:
        inspect.signature(fn).bind(config=cfg, **kwargs)
    except TypeError as exc:
        raise SpecError(f"training entrypoint {spec.entrypoint} cannot be called as fn(config=..., "
                        f"{', '.join(f'{k}=...' for k in kwargs)}): {exc} (training.kwargs / train_kwargs)") from None
    t0 = time.perf_counter()
    state = _state_dict(fn(config=cfg, **kwargs), spec.entrypoint)
    seconds = time.perf_counter() - t0
    # Clone: safetensors refuses tensors sharing memory; detach/cpu: what any caller could hand back.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in load_object(cfg.model.factory)(**cfg.model.kwargs).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = [f"{k} {tuple(tensors[k].shape)} != {expected[k]}" for k in sorted(set(expected) & set(tensors))
                if tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or reshaped:
        raise SpecError(f"training entrypoint {spec.entrypoint} returned weights that do not fit model.factory "
                        f"{cfg.model.factory}({cfg.model.kwargs}): missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, other shape {reshaped[:5]}")
    store = ArtifactStore(cfg.store_url)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / (spec.weights_name or f"{cfg.model.name}.safetensors")
        save_file(tensors, str(path), metadata={"edgeq.trainer": spec.entrypoint})
        ref = store.put_file(path, meta={"trainer": spec.entrypoint, "kwargs": kwargs})
    return TrainResult(weights=ref, entrypoint=spec.entrypoint, kwargs=kwargs, seconds=seconds)


def train_cache_key(cfg: EdgeqConfig, kwargs: dict[str, Any]) -> str:
    spec = training_spec(cfg)
    return content_key("train", trainer=code_fingerprint(spec.entrypoint), entrypoint=spec.entrypoint, kwargs=kwargs,
                       weights_name=spec.weights_name, train=split_fingerprint(cfg.data.train),
                       preprocess=cfg.data.preprocess.model_dump(mode="json"),
                       factory=code_fingerprint(cfg.model.factory), model_kwargs=cfg.model.kwargs,
                       store=cfg.store_url)


@task(name="train", cache_key_fn=lambda ctx, p: train_cache_key(p["cfg"], p["kwargs"]), persist_result=True,
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def train_task(cfg: EdgeqConfig, kwargs: dict[str, Any]) -> TrainResult:
    result = train_to_store(cfg, kwargs)
    get_run_logger().info("trained with %s(%s) in %.1fs: weights %s", result.entrypoint, kwargs, result.seconds,
                          result.weights.uri)
    return result


def run_train_stage(cfg: EdgeqConfig, kwargs: dict[str, Any], retrain: bool = False) -> TrainResult:
    """The cached training task, re-run when asked or when its weights have gone from the store."""
    train = on_store(train_task, cfg.store_url)
    result = train.with_options(refresh_cache=True)(cfg, kwargs) if retrain else train(cfg, kwargs)
    if not ArtifactStore(cfg.store_url).exists(result.weights):
        result = train.with_options(refresh_cache=True)(cfg, kwargs)
    return result


# -- the flow ------------------------------------------------------------------------------------------

def retrained_config(cfg: EdgeqConfig, weights: Path) -> dict[str, Any]:
    """The config as an inline dict (absolute paths) pointing at the new weights; its prepare hook already ran."""
    data = cfg.model_dump(mode="json")
    data["model"]["weights"] = str(weights)
    data["store"] = cfg.store_url
    data["prepare"] = None
    data["prepare_kwargs"] = {}
    return data


@flow(name="retrain-to-deploy", log_prints=True)
def retrain_to_deploy(params: RetrainParams = RetrainParams()) -> RetrainResult:
    """Train, store the new weights, convert them; succeeds only when a bundle is published."""
    logger = get_run_logger()
    cfg = load_prepared(params.config)
    kwargs = {**training_spec(cfg).kwargs, **params.train_kwargs}
    trained = run_train_stage(cfg, kwargs, params.retrain)
    store = ArtifactStore(cfg.store_url)
    weights = store.local_path(trained.weights)
    convert = ConvertParams(inline=retrained_config(cfg, weights), calibration=params.calibration, mode=params.mode,
                            max_drop=params.max_drop)
    logger.info("converting %s", trained.weights.uri)
    manifest = convert_model(convert)  # holds the model's conversion slot itself
    published = read_manifest(store, manifest["bundle_id"])
    if published is None:
        raise EdgeqError(f"convert_model returned bundle {manifest['bundle_id']} but no manifest is in "
                         f"{cfg.store_url}: nothing was published")
    if published["model"].get("weights_sha256") != trained.weights.sha256:
        raise EdgeqError(f"bundle {manifest['bundle_id']} was built from weights "
                         f"{str(published['model'].get('weights_sha256'))[:12]}…, not the retrained "
                         f"{trained.weights.sha256[:12]}…")
    message = (f"retrained {cfg.model.name} with {trained.entrypoint}; published {manifest['bundle_id']} "
               f"at {manifest['uri']}")
    create_markdown_artifact(
        key="retrain-to-deploy", description="retrained weights and the bundle built from them",
        markdown=f"# Retrained and published `{manifest['bundle_id']}`\n\n"
                 f"- trainer `{trained.entrypoint}` with `{kwargs}` ({trained.seconds:.1f}s)\n"
                 f"- weights `{trained.weights.uri}` (sha256 `{trained.weights.sha256[:16]}…`)\n"
                 f"- calibration `{published['calibration']['version']}`\n- bundle `{manifest['uri']}`\n")
    logger.info(message)
    return RetrainResult(weights=trained.weights, bundle_id=manifest["bundle_id"], bundle_uri=manifest["uri"],
                         calibration_version=published["calibration"]["version"], train_seconds=trained.seconds,
                         message=message)

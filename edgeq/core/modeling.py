"""Build the user's model from its factory and load its weights safely."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from edgeq.core.errors import SpecError
from edgeq.core.specs import ModelSpec, load_object


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load weights without ever unpickling code.

    safetensors files hold tensors only; anything else goes through
    ``torch.load(weights_only=True)``, whose restricted unpickler refuses
    pickles that would import or call arbitrary code.
    """
    if not path.is_file():
        raise SpecError(f"weights file {path} does not exist (model.weights in the config)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise SpecError(f"weights file {path} is not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(
            f"refusing weights file {path}: it is a pickle that carries code or objects other than "
            f"tensors ({first}). Save a state_dict with safetensors (safetensors.torch.save_file) "
            "or torch.save(model.state_dict())."
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"weights file {path} could not be read: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SpecError(f"weights file {path} must hold a state_dict (name -> tensor), got {type(obj).__name__}")
    return obj


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The factory's module with the spec's weights loaded, in eval mode."""
    factory = load_object(spec.factory)
    try:
        model = factory(**spec.kwargs)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"model factory {spec.factory}({spec.kwargs}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"model factory {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    state = load_state_dict(spec.weights)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:5])}")
        raise SpecError(
            f"weights {spec.weights.name} do not match the model built by {spec.factory}({spec.kwargs}): "
            + " | ".join(parts)
        )
    model.load_state_dict(state, strict=True)
    return model.eval()

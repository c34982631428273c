"""Runtime backends behind one contract, found by name; each SDK is imported only when used."""

from __future__ import annotations

import importlib

from backends.base import Backend

# name -> "module:Class"; modules are imported on first use so a missing SDK costs nothing here.
_REGISTRY: dict[str, str] = {
    "onnxruntime": "backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "backends.openvino:OpenVinoBackend",
}


def known_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered under `name`; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        from edgeq.errors import SpecError

        raise SpecError(f"unknown backend {name!r}; known backends: {', '.join(known_backends())}")
    module_name, _, cls_name = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)()

"""What every run does first: load the config, run its `prepare` hook (e.g. building the demo), and check what
can be checked before any stage writes to the store (the metric's import path, each target's own fields)."""

from __future__ import annotations

from pathlib import Path

from edgeq.backends import get_backend
from edgeq.core.errors import SpecError
from edgeq.core.metrics import resolve_metric
from edgeq.core.specs import EdgeqConfig, load_config, load_object


def prepare(cfg: EdgeqConfig) -> None:
    check_targets(cfg)
    if cfg.prepare is not None:
        run_prepare_hook(cfg)
    check_metric(cfg)


def check_targets(cfg: EdgeqConfig) -> None:
    """Each target's backend exists and has the fields it needs (a declared target's profile, a command)."""
    for target in cfg.targets:
        try:
            get_backend(target.backend).check_target(target)
        except SpecError as exc:
            if target.name in str(exc):
                raise
            raise SpecError(f"target {target.name!r}: {exc}") from None


def check_metric(cfg: EdgeqConfig) -> None:
    """Import a user metric now, so a bad import path fails before any stage writes to the store."""
    if cfg.model.metric in ("top1", "cosine"):
        return
    try:
        resolve_metric(cfg.model.metric)
    except SpecError as exc:
        raise SpecError(f"model.metric {cfg.model.metric!r}: {exc}") from None


def run_prepare_hook(cfg: EdgeqConfig) -> None:
    fn = load_object(cfg.prepare)
    kwargs = dict(cfg.prepare_kwargs)
    # A relative `root`/`path` kwarg is relative to the config file, like every other path.
    for k in ("root", "path"):
        if isinstance(kwargs.get(k), str) and not Path(kwargs[k]).is_absolute():
            kwargs[k] = str(cfg.base_dir / kwargs[k])
    try:
        fn(**kwargs)
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"prepare hook {cfg.prepare} failed: {type(exc).__name__}: {exc}") from exc


def load_prepared(path: str | Path) -> EdgeqConfig:
    cfg = load_config(path)
    prepare(cfg)
    return cfg

"""Declared targets: a static check of the ONNX graph against a target profile (YAML).

For toolchains that cannot be installed here (e.g. Hailo DFC, vendor NPUs). Nothing is compiled:
a passing row is "declared-ok" ("nothing in the graph contradicts the profile"), never "compiled".
A target's ``profile`` is a YAML path, or the name of a profile shipped in ``edgeq/backends/profiles``
(``hailo8-example``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeq.backends.base import Backend, fix_batch
from edgeq.backends.records import CompileReport, Int8Scheme, PreparedModel
from edgeq.backends.runner import Runner
from edgeq.core.errors import EdgeqError, SpecError
from edgeq.core.onnx_graph import graph_inputs
from edgeq.core.store import sha256_file

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class TargetProfile(BaseModel):
    """What a toolchain accepts, as its owner declares it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    vendor: str = ""
    toolchain: str = ""
    max_opset: int = Field(ge=7)
    static_shapes: bool = True
    layouts: list[Literal["NCHW", "NHWC"]] = Field(default_factory=lambda: ["NCHW"])
    control_flow: bool = False
    ops: list[str] = Field(min_length=1, description="op types, 'Conv' or 'domain::Op' outside the standard domain")

    def has_op(self, domain: str, op_type: str) -> bool:
        return (op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}") in set(self.ops)


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def resolve_profile(path: str | Path | None, target_name: str = "?") -> Path:
    """The profile file: the path itself, or a shipped profile of that name."""
    if path is None:
        raise SpecError(f"target {target_name!r}: backend 'declared' needs 'profile' (shipped: {', '.join(shipped_profiles())})")
    path = Path(path)
    if path.is_file():
        return path
    shipped = PROFILES_DIR / f"{path.stem}.yaml"
    if path.suffix == "" and shipped.is_file():
        return shipped
    raise SpecError(f"target {target_name!r}: profile file {path} does not exist "
                    f"(or name a shipped profile: {', '.join(shipped_profiles())})")


@lru_cache(maxsize=32)
def _load(path: str, sha: str) -> TargetProfile:
    try:
        data = yaml.safe_load(Path(path).read_text())
        return TargetProfile.model_validate(data)
    except yaml.YAMLError as exc:
        raise SpecError(f"target profile {path} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        probs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"target profile {path}: {probs}") from None


def load_profile(path: str | Path | None, target_name: str = "?") -> TargetProfile:
    p = resolve_profile(path, target_name)
    return _load(str(p), sha256_file(p))  # keyed by content: an edited profile is re-read


class DeclaredBackend(Backend):
    name = "declared"
    compiles = False
    measures_latency = False
    ships_compiled_form = False  # compiled with the vendor toolchain, outside edgeq

    def check_target(self, target) -> None:
        if target.profile is None:
            raise SpecError(f"target {target.name!r}: backend 'declared' needs 'profile' (a target profile YAML, "
                            "e.g. edgeq/backends/profiles/hailo8-example.yaml)")

    def int8_scheme(self, target) -> Int8Scheme:
        return Int8Scheme(types="s8s8", reason="vendor NPU compilers (declared targets) expect symmetric signed INT8")

    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        return True, ""  # a static check runs anywhere

    def version(self) -> str:
        return "declared profile"

    def cache_fingerprint(self, target) -> str:
        # The profile is the toolchain here: an edited profile file must re-run the check.
        try:
            profile = sha256_file(resolve_profile(target.profile, target.name))
        except SpecError as exc:
            profile = f"missing:{exc}"
        return f"{self.version()}; profile {profile}"

    def no_compiled_form_reason(self, target) -> str:
        return "declared target: compile with the vendor toolchain"

    def max_opset(self, target=None) -> int:
        if target is None:
            # The limit lives in the target's profile; a caller without the target cannot know it.
            raise SpecError("a declared target's maximum opset comes from its profile: pass the target "
                            "(backend.max_opset(target)), or set max_opset on the declared target "
                            "(hailo8-example: max_opset: 17)")
        return load_profile(target.profile, target.name).max_opset

    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        if target is None or target.profile is None:
            return False
        if op_type in ("If", "Loop", "Scan") and domain in ("", "ai.onnx"):
            return load_profile(target.profile, target.name).control_flow
        return load_profile(target.profile, target.name).has_op(domain, op_type)

    def check_compiles(self, model_path, target, out_dir=None, **kwargs) -> CompileReport:
        try:
            load_profile(target.profile, target.name)
        except SpecError as exc:
            return CompileReport(target=target.name, backend=self.name, device=target.device, required=target.required,
                                 status="failed", reason=str(exc), precision_asked=target.precision,
                                 layout=target.layout, batch=target.batch, toolchain=self.version())
        return super().check_compiles(model_path, target, out_dir, **kwargs)

    def declared_checks(self, model, target, report: CompileReport, dims) -> None:
        profile = load_profile(target.profile, target.name)
        report.toolchain = f"declared: {profile.name} ({profile.toolchain or profile.vendor})"
        report.precision = f"{target.precision} (declared)"
        reasons = []
        if report.opset is not None and report.max_opset is not None and report.opset > report.max_opset:
            reasons.append(f"model opset {report.opset} is above target {target.name!r}'s maximum {report.max_opset} "
                           f"(profile {profile.name!r} max_opset {profile.max_opset}, target max_opset "
                           f"{target.max_opset}): re-export at opset <= {report.max_opset}")
        if report.unsupported_ops:
            names = ", ".join(f"{u.label} (node {u.node!r})" for u in report.unsupported_ops[:10])
            more = f" and {len(report.unsupported_ops) - 10} more" if len(report.unsupported_ops) > 10 else ""
            reasons.append(f"op(s) outside profile {profile.name!r} of target {target.name!r}: {names}{more} — replace "
                           "them in the model, or add them to the profile if the toolchain now supports them")
            for u in report.unsupported_ops:
                u.reason = f"not in profile {profile.name}"
        if report.control_flow and not profile.control_flow:
            reasons.append(f"profile {profile.name!r} has no control flow; the model has {', '.join(report.control_flow)}")
        if target.layout not in profile.layouts:
            reasons.append(f"target {target.name!r} asks layout {target.layout}, profile {profile.name!r} takes "
                           f"{'/'.join(profile.layouts)}")
        if profile.static_shapes:
            if target.batch == "dynamic":
                reasons.append(f"target {target.name!r} asks batch: dynamic, but profile {profile.name!r} needs static "
                               "shapes: set batch: static1")
            shapes, _ = fix_batch(graph_inputs(model), target.batch, dims)
            report.input_shapes = shapes
            dynamic = [f"{n}{s}" for n, s in shapes.items() if any(not isinstance(d, int) for d in s)]
            if dynamic and target.batch != "dynamic":
                reasons.append(f"profile {profile.name!r} needs static shapes; dynamic beyond batch: "
                               f"{', '.join(dynamic)} (fix those dimensions at export)")
        report.reason = "; ".join(reasons)

    def prepare(self, model_path, target, out_dir, dims=None) -> PreparedModel:
        raise EdgeqError(f"target {target.name!r} is declared (backend 'declared'): it has no toolchain on this "
                         "machine to prepare or run a model; run it on the device with its vendor's compiler")

    def load_runner(self, prepared, target) -> Runner:
        raise EdgeqError(f"target {target.name!r} is declared: no runner on this machine")

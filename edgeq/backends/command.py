"""A remote or external device runner: any program that takes inputs and returns outputs.

Plugging in a real edge board: write a small program (shell, Python, anything) that is called as

    COMMAND... MODEL.onnx INPUTS.npz OUTPUTS.npz

and must write OUTPUTS.npz with one array per model output name. The model file is the deployable
form edgeq prepared (the INT8 ONNX model, batch fixed to 1 unless the target asks
``batch: dynamic``); the program typically copies it to the board once
(scp, adb push, a vendor's flashing tool), runs it there on the named inputs in INPUTS.npz, and
copies the outputs back. A non-zero exit or a missing output is an error that names the command;
an exit code of 75 (EX_TEMPFAIL: device busy, link down) is treated as transient and retried.
A command device is not timed (`measures_latency` False): each run starts the program.
Configure it as a target:

    - {name: board, backend: command, command: [python, tools/run_on_board.py], required: false}
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgeq.backends.base import Backend, fix_batch
from edgeq.backends.onnxruntime import OnnxRuntimeBackend
from edgeq.backends.records import Int8Scheme, PreparedModel
from edgeq.backends.runner import Runner
from edgeq.core.errors import RunnerError, SpecError, TransientError
from edgeq.core.onnx_graph import TensorMeta, graph_inputs, load_onnx

EX_TEMPFAIL = 75


class CommandRunner(Runner):
    def __init__(self, prepared: PreparedModel, command: list[str], timeout_s: float = 120.0):
        super().__init__(name=f"command {command[0]}", target=prepared.target)
        self.prepared, self.command, self.timeout_s = prepared, command, timeout_s
        self._tmp: str | None = None

    def activate_impl(self) -> None:
        self.inputs = self.prepared.inputs
        self.outputs = self.prepared.outputs
        self.precision = self.prepared.precision
        self.batch = self.prepared.batch
        self._tmp = tempfile.mkdtemp(prefix="edgeq-command-")

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tmp = Path(self._tmp)
        inp, out = tmp / "inputs.npz", tmp / "outputs.npz"
        out.unlink(missing_ok=True)
        np.savez(inp, **feeds)
        cmd = [*self.command, str(self.prepared.path), str(inp), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise TransientError(f"device command {' '.join(self.command)} timed out after {self.timeout_s:g} s") from exc
        if proc.returncode == EX_TEMPFAIL:
            raise TransientError(f"device command {' '.join(self.command)} reported a transient failure: "
                                 f"{proc.stderr.strip()[-300:]}")
        if proc.returncode != 0:
            raise RunnerError(f"device command {' '.join(self.command)} exited {proc.returncode}: "
                              f"{proc.stderr.strip()[-300:]}")
        if not out.is_file():
            raise RunnerError(f"device command {' '.join(self.command)} wrote no {out.name}")
        with np.load(out, allow_pickle=False) as z:
            missing = [o for o in self.outputs if o not in z]
            if missing:
                raise RunnerError(f"device command {' '.join(self.command)} returned no output(s) {missing} "
                                  f"(got {list(z.keys())})")
            return {o: z[o] for o in self.outputs}

    def deactivate_impl(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


class CommandBackend(Backend):
    name = "command"
    # Every run starts the device program (for a real board also a copy of the model and the data there and back):
    # timing runs here would time that, not the device's inference (0.13 s a run with a local Python stand-in, 110
    # runs a compile check). The compile check and the device stage run the model; no latency is recorded for it.
    measures_latency = False

    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        return True, ""  # the program is checked per target, in prepare

    def int8_scheme(self, target) -> Int8Scheme:
        return Int8Scheme(types="u8s8", reason="an external device program: unsigned activations + signed weights "
                                               "(what CPU INT8 kernels take); set quantization.types for your board")

    def max_opset(self, target=None) -> int:
        if target is not None and target.max_opset:
            return target.max_opset
        return OnnxRuntimeBackend().max_opset()

    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        return domain in ("", "ai.onnx")  # what the device runs is the device's business; custom ops are not

    def check_target(self, target) -> None:
        if not target.command:
            raise SpecError(f"target {target.name!r}: backend 'command' needs 'command' (the program to run)")

    def prepare(self, model_path, target, out_dir, dims=None) -> PreparedModel:
        self.check_target(target)
        if shutil.which(target.command[0]) is None and not Path(target.command[0]).is_file():
            raise SpecError(f"target {target.name!r}: device command {target.command[0]!r} not found")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dst = out / Path(model_path).name
        proto = load_onnx(model_path)
        inputs = graph_inputs(proto)
        shapes, _ = fix_batch(inputs, target.batch, dims)
        original = {m.name: m.shape for m in inputs}
        fixed = {n: s for n, s in shapes.items() if s != original[n] and all(isinstance(d, int) for d in s)}
        if fixed:
            # The device gets the same static form every other backend runs, not a batch it will never be fed.
            import onnx
            from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

            for name, shape in fixed.items():
                make_input_shape_fixed(proto.graph, name, shape)
            onnx.save(proto, str(dst))
        else:
            shutil.copy(model_path, dst)
        return PreparedModel(backend=self.name, target=target.name, path=dst, files={"model": dst},
                             inputs=[TensorMeta(name=m.name, shape=shapes[m.name], dtype=m.dtype) for m in inputs],
                             outputs=[o.name for o in proto.graph.output], layout=target.layout, batch=target.batch,
                             precision=target.precision)

    def load_runner(self, prepared: PreparedModel, target) -> Runner:
        return CommandRunner(prepared, list(target.command))

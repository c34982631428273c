"""A real Prefect server, work pool, deployments and process worker on loopback, as a user sets them up.

Every command is the README's (deployments/README.md), run with this interpreter's environment (the repo venv),
so the worker's flow runs import the same edgeq.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POOL = "edgeq-process"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPrefect:
    """`prefect server start` + `prefect work-pool create` + `prefect deploy` + `prefect worker start`."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(home / "prefect-home"),
            "PREFECT_API_URL": self.api,
            # The UI asks this URL for its API; without it a server off port 4200 shows "Can't connect".
            "PREFECT_UI_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_CLI_COLORS": "false",
            "PYTHONUNBUFFERED": "1",
        })
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    # -- processes ---------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=REPO, env=self.env,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def cli(self, *args: str, timeout: float = 180) -> str:
        """Run `prefect ARGS` from the repo root; raise with its output when it fails."""
        out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"`prefect {' '.join(args)}` exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                return json.loads(r.read()) is True
        except OSError:
            return False

    def start(self, timeout: float = 150) -> "LocalPrefect":
        server = self._spawn("server", ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited {server.returncode}:\n{self.tail('server')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {timeout}s:\n{self.tail('server')}")
            time.sleep(0.5)
        self.cli("work-pool", "create", POOL, "--type", "process")
        self.deploy_output = self.cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
        self._spawn("worker", ["worker", "start", "--pool", POOL])
        return self

    def tail(self, name: str, n: int = 60) -> str:
        log = self.logs.get(name)
        if log is None or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        for name in ("worker", "server"):  # the worker first: it reports its runs to the server
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the worker's flow-run children too
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

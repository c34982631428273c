"""A throw-away scale-out rig on this machine: PostgreSQL, a Prefect server on it, a process work pool, workers.

The scaling benchmark (`python -m edgeq.benchmarks.scaling`) and the multi-worker tests (tests/scaleout) run
Prefect's own engine with it, for real: every piece is the program a team runs (`initdb` and `pg_ctl`,
`prefect server start`, `prefect work-pool create`, `prefect deploy`, `prefect worker start`), each a separate
process with its own PREFECT_HOME, all in a temporary folder that is removed afterwards. Everything listens on
127.0.0.1 only.

    with Postgres() as pg, PrefectServer(folder, database_url=pg.url) as server:
        server.cli("work-pool", "create", "edgeq-process", "--type", "process")
        server.worker("a", pool="edgeq-process", limit=1, cpu=0)      # one flow run at a time, pinned to CPU 0
        server.wait_for_workers("edgeq-process", ["a"])
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[2]
PG_SUPERUSER = "prefect"
PG_DATABASE = "prefect"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder holding PostgreSQL's server programs (initdb, pg_ctl, postgres), or None when there is none.

    Looked for in $EDGEQ_PG_BIN, next to `pg_ctl` on PATH, then under /usr/lib/postgresql/<major>/bin (Debian and
    Ubuntu keep the server programs off PATH), newest major first.
    """
    candidates = [Path(os.environ["EDGEQ_PG_BIN"])] if os.environ.get("EDGEQ_PG_BIN") else []
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).resolve().parent)
    debian = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates += sorted(debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for c in candidates:
        if all((c / prog).is_file() for prog in ("initdb", "pg_ctl", "postgres")):
            return c
    return None


def _service_account() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None to run it as ourselves.

    PostgreSQL refuses to start as root; CI containers often run as root. Then the cluster runs as the `postgres`
    account (the Debian package creates it) or, failing that, `nobody`.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root and there is neither a 'postgres' nor a 'nobody' account to run "
                       "PostgreSQL as (it refuses to run as root)")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first-level and deeper), from /proc, including those that started
    a session of their own (Prefect's process worker starts each flow run in its own session)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and every process below it, those already ended included (as far as
    they were waited for), from /proc; 0 for a process that is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for i, p in enumerate([pid, *descendants(pid)]):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, and for the root also cutime, cstime (its ended children's; the living ones count below)
        total += sum(int(f) for f in fields[11:13 if i else 15]) / tick
    return total


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal a process started in its own session, its group, and every process group below it (no wait)."""
    if proc.poll() is not None:
        return
    below = descendants(proc.pid)
    groups = {proc.pid}
    for pid in below:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_trees(procs: Iterable[subprocess.Popen], sig: int = signal.SIGKILL, grace: float = 0) -> None:
    """`signal_tree` every process at once, wait up to `grace` seconds (30 when 0) for all of them together, then
    SIGKILL the trees of those still running. Stopping them side by side: one after the other, a 20 s grace each,
    two workers took 41 s to stop."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        signal_tree(p, sig)
    deadline = time.monotonic() + (grace or 30)
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_tree(p, signal.SIGKILL)
            p.wait(timeout=30)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 0) -> None:
    """Signal a process started in its own session and everything below it; wait for it (SIGKILL after `grace`)."""
    kill_trees([proc], sig, grace)


def _clean_env() -> dict[str, str]:
    """This process's environment without its Prefect settings (a test session's PREFECT_HOME, API URL...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Postgres:
    """A PostgreSQL cluster in a temporary folder, on a free loopback port, trust authentication (loopback only).

    `url` is the SQLAlchemy URL Prefect's server takes in PREFECT_API_DATABASE_CONNECTION_URL. `stop()` and
    `start()` may be called again to take the database away and bring it back (same data, same port).
    """

    def __init__(self, bin_dir: Path | None = None):
        found = bin_dir or postgres_bin()
        if found is None:
            raise FileNotFoundError("PostgreSQL server programs (initdb, pg_ctl, postgres) not found: set "
                                    "EDGEQ_PG_BIN, put pg_ctl on PATH, or install them (Debian: postgresql)")
        self.bin = found
        self.account = _service_account()
        # Under the system temp folder, not a per-user one: the service account must be able to reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="edgeq-pg-"))
        if self.account:
            os.chown(self.dir, *self.account)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._created = False

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{PG_SUPERUSER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    def _run(self, prog: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        owner = {"user": self.account[0], "group": self.account[1], "extra_groups": []} if self.account else {}
        env = {**_clean_env(), "LC_ALL": "C", "LANG": "C"}
        out = subprocess.run([str(self.bin / prog), *args], cwd=self.dir, env=env, capture_output=True, text=True,
                             timeout=timeout, **owner)
        if check and out.returncode != 0:
            raise RuntimeError(f"{prog} {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}\n"
                               f"{self.tail()}")
        return out

    def start(self) -> "Postgres":
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", PG_SUPERUSER, "--auth=trust", "-E", "UTF8",
                      "--locale=C")
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                    # A throw-away cluster: durability across a power cut is not what it is for, speed is.
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        if not self._created:
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_SUPERUSER, PG_DATABASE)
            self._created = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m MODE`: fast disconnects every client and shuts down cleanly; immediate aborts."""
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (every PostgreSQL process of the cluster is below it)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def is_ready(self) -> bool:
        return self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode == 0

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class PrefectServer:
    """`prefect server start` on a free loopback port, optionally on PostgreSQL, plus the CLI and workers around it.

    `folder` holds the server's PREFECT_HOME, every worker's own PREFECT_HOME and all logs (`<name>.log`).
    `results` is Prefect's result storage shared by every worker (PREFECT_LOCAL_STORAGE_PATH): a cache hit
    recorded by one worker is a hit for the next. `worker_env` is added to every worker's environment.
    """

    def __init__(self, folder: Path, database_url: str | None = None, results: Path | None = None,
                 worker_env: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.results = Path(results or self.folder / "results")
        self.worker_env = dict(worker_env or {})
        env = _clean_env()
        env.update({
            "PREFECT_HOME": str(self.folder / "server-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_UI_API_URL": self.api,  # the UI's API; without it a server off port 4200 shows "Can't connect"
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(self.results),
        })
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def tail(self, name: str, n: int = 60) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _spawn(self, name: str, args: list[str], env: dict[str, str], cpu: int | None = None) -> subprocess.Popen:
        # Pinned before exec, so the process and everything it starts (the worker's flow runs) stay on that CPU.
        pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        with self.log(name).open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pin)
        self.procs[name] = proc
        return proc

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                return json.loads(r.read()) is True
        except (OSError, ValueError):
            return False

    def start(self, timeout: float = 180) -> "PrefectServer":
        server = self._spawn("server", ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                             self.env)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited {server.returncode}:\n{self.tail('server')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {timeout:.0f}s:\n{self.tail('server')}")
            time.sleep(0.5)
        return self

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 180) -> str:
        """`prefect --no-prompt ARGS` against this server (from the repository root unless `cwd`)."""
        out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=cwd or REPO, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"`prefect {' '.join(args)}` exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def worker(self, name: str, pool: str, queues: Iterable[str] = (), limit: int | None = 1,
               cpu: int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`prefect worker start --pool POOL --name NAME [--work-queue Q ...] [--limit N]` with a PREFECT_HOME of
        its own, the shared result storage, and `cpu` (when given) as the only CPU it and its flow runs use."""
        wenv = {**self.env, "PREFECT_HOME": str(self.folder / f"{name}-home"),
                # Polls every second, and a heartbeat every 5 s so the server soon hears of a (re)started worker.
                "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
                **self.worker_env, **(env or {})}
        for k in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_LOGGING_LEVEL",
                  "PREFECT_SERVER_ANALYTICS_ENABLED"):
            wenv.pop(k, None)  # server settings: a worker only talks to the API
        args = ["worker", "start", "--pool", pool, "--name", name]
        for q in queues:
            args += ["--work-queue", q]
        if limit is not None:
            args += ["--limit", str(limit)]
        return self._spawn(name, args, wenv, cpu=cpu)

    def wait_for_workers(self, pool: str, names: Iterable[str], since: float | None = None,
                         timeout: float = 120) -> None:
        """Until every named worker is ONLINE, with a heartbeat at or after `since` (a time.time()) when given: a
        restarted worker keeps its name, and the record of its previous life looks online for a while."""
        from prefect.client.orchestration import SyncPrefectClient

        want, deadline = set(names), time.monotonic() + timeout
        with SyncPrefectClient(self.api) as client:
            while True:
                online = {w.name for w in client.read_workers_for_work_pool(pool)
                          if w.status.value == "ONLINE"
                          and (since is None or w.last_heartbeat_time.timestamp() >= since)}
                if want <= online:
                    return
                for n in want:
                    proc = self.procs.get(n)
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(f"worker {n} exited {proc.returncode}:\n{self.tail(n)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers {sorted(want - online)} not online after {timeout:.0f}s")
                time.sleep(0.5)

    def ran_by(self, flow_run_id: object) -> list[str]:
        """The workers that ran a flow run, from their own logs: each idle worker may pick up a scheduled run ("Worker
        'NAME' submitting flow run ID"); the server lets one move it to Pending and aborts the others' submissions
        ("Aborted submission of flow run ID"). One name for a run that ran once."""
        out = []
        for name in self.procs:
            text = self.log(name).read_text(errors="replace") if self.log(name).exists() else ""
            if f"submitting flow run '{flow_run_id}'" in text and f"Aborted submission of flow run '{flow_run_id}'" \
                    not in text:
                out.append(name)
        return out

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signal a process, the processes it started and theirs (a worker and its flow runs), and wait for it."""
        proc = self.procs.get(name)
        if proc is not None:
            kill_tree(proc, sig, grace=20)

    def close(self) -> None:
        """Stop every worker (side by side), then the server they report to."""
        kill_trees([p for n, p in self.procs.items() if n != "server"], signal.SIGTERM, grace=20)
        self.stop_process("server")

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

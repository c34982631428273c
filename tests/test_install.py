"""edgeq installs as one import namespace, `edgeq`, with real pip: a regular install and an editable one.

Every module lives under edgeq/ (edgeq.flows, edgeq.tasks, edgeq.backends, edgeq.calibration, ...). These tests
check that nothing else lands in site-packages, that an editable install serves the source folders, and that every
module and the `edgeq` command work from outside the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("export", "check", "calibrate", "quantize", "convert", "demo", "calibration")
MAPPED = {"edgeq.flows": "edgeq/flows", "edgeq.tasks": "edgeq/tasks", "edgeq.backends": "edgeq/backends",
          "edgeq.calibration": "edgeq/calibration", "edgeq.backends.profiles": "edgeq/backends/profiles"}


def _not_source(folder: str, names: list[str]) -> set[str]:
    """Left out of the copy: caches, and at the top level build outputs and dot folders (git, virtual
    environments, stores, wheel caches), none of which a build reads."""
    top = Path(folder) == REPO
    return {n for n in names if n == "__pycache__"
            or top and (n.startswith(".") or n == "build" or n.endswith(".egg-info"))}


def copy_source(dest: Path) -> Path:
    # Builds run from a copy: setuptools builds in the source tree's build/lib and never deletes a module removed
    # from the source since, so an install of the working tree itself can carry a file that no longer exists; and
    # a build here would race with anyone else building in this checkout.
    shutil.copytree(REPO, dest, ignore=_not_source)
    return dest


def run(cmd: list[str], cwd: Path, pythonpath: Path | None = None, timeout: float = 180) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def stage_install(tmp: Path) -> Path:
    """A regular (non-editable) install of a copy of the working tree, into `tmp/site`; no network."""
    src = copy_source(tmp / "src")
    site = tmp / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
         "--target", site, src], cwd=tmp)
    return site


def module_files(python: str | Path, cwd: Path, pythonpath: Path | None = None, every: bool = False) -> dict[str, str]:
    """Import the mapped packages (`every`: all modules under edgeq, found by walking the installed packages)
    and return {module: its file}, plus where the example Hailo profile resolves."""
    code = (
        "import importlib, importlib.resources, json, pkgutil, sys\n"
        "import edgeq\n"
        f"names = {sorted(MAPPED)!r}\n"
        + ("names += [m.name for m in pkgutil.walk_packages(edgeq.__path__, 'edgeq.')]\n" if every else "") +
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "files = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())\n"
        "         if n == 'edgeq' or n.startswith('edgeq.')}\n"
        "files['<hailo8-example.yaml>'] = str(importlib.resources.files('edgeq.backends.profiles')\n"
        "                                     .joinpath('hailo8-example.yaml'))\n"
        "print(json.dumps(files))\n"
    )
    return json.loads(run([python, "-c", code], cwd=cwd, pythonpath=pythonpath).strip().splitlines()[-1])


def assert_lists_commands(help_text: str) -> None:
    for cmd in COMMANDS:
        assert re.search(rf"^\W*{cmd}\s", help_text, re.M), f"`edgeq --help` does not list {cmd!r}:\n{help_text}"


# ---------------------------------------------------------------- a regular install
@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return stage_install(tmp_path_factory.mktemp("install"))


def test_a_regular_install_adds_only_the_edgeq_package(staged):
    names = sorted(p.name for p in staged.iterdir())
    dist_info = [n for n in names if re.fullmatch(r"edgeq-[^-]+\.dist-info", n)]
    assert len(dist_info) == 1 and sorted(set(names) - set(dist_info)) == ["bin", "edgeq"], names
    assert (staged / dist_info[0] / "top_level.txt").read_text().split() == ["edgeq"]
    for mapped, folder in MAPPED.items():
        assert (staged / mapped.replace(".", "/") / "__init__.py").is_file(), f"{mapped} (from {folder}/) missing"


def test_every_module_imports_from_the_installed_copy(staged, tmp_path):
    files = module_files(sys.executable, cwd=tmp_path, pythonpath=staged, every=True)
    assert set(MAPPED) | {"edgeq.flows.convert", "edgeq.cli", "edgeq.core.store"} <= set(files)
    # This environment's editable install would quietly fill in any module missing from the copy.
    outside = {n: f for n, f in files.items() if f and not Path(f).resolve().is_relative_to(staged.resolve())}
    assert not outside, f"modules loaded from outside the installed copy: {outside}"
    assert Path(files["<hailo8-example.yaml>"]).is_file(), "the example Hailo profile is not installed as package data"


def test_the_installed_command_lists_the_commands_from_another_directory(staged, tmp_path):
    assert_lists_commands(run([staged / "bin" / "edgeq", "--help"], cwd=tmp_path, pythonpath=staged))
    assert_lists_commands(run([sys.executable, "-c", "from edgeq.cli import app; app()", "--help"],
                              cwd=tmp_path, pythonpath=staged))


# ---------------------------------------------------------------- editable installs
def test_this_environments_editable_install_maps_the_repository_folders(tmp_path):
    from importlib.metadata import distributions

    # Looked up in site-packages only: the checkout's own edgeq.egg-info is on sys.path too and records no URL.
    dist = next(distributions(name="edgeq", path=[sysconfig.get_path("purelib")]), None)
    if dist is None:
        pytest.skip("edgeq is not installed in this environment")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct.get("dir_info", {}).get("editable") or Path(direct["url"].removeprefix("file://")) != REPO:
        pytest.skip(f"edgeq is not installed editable from {REPO} here ({direct.get('url')})")
    files = module_files(sys.executable, cwd=tmp_path)
    for mapped, folder in MAPPED.items():
        assert Path(files[mapped]) == REPO / folder / "__init__.py", (mapped, files[mapped])
    script = Path(sysconfig.get_path("scripts")) / "edgeq"
    assert_lists_commands(run([script, "--help"], cwd=tmp_path))


def test_a_fresh_editable_install_maps_the_source_folders(tmp_path):
    src = copy_source(tmp_path / "src")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).strip())
    # The fresh environment borrows this one's packages (torch, prefect, pip, setuptools) through a path entry:
    # installing them again would take minutes and the network. A plain path entry runs none of that folder's
    # .pth files, so this environment's own edgeq finder stays out.
    (purelib / "_borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: pip sees this environment's edgeq through the borrowed path and must leave it alone.
    run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--ignore-installed",
         "-e", src], cwd=tmp_path)
    files = module_files(py, cwd=tmp_path)
    for mapped, folder in MAPPED.items():
        assert Path(files[mapped]) == src / folder / "__init__.py", (mapped, files[mapped])
    outside = {n: f for n, f in files.items() if f and not Path(f).resolve().is_relative_to(src.resolve())}
    assert not outside, f"modules loaded from outside the editable source: {outside}"
    assert_lists_commands(run([venv / "bin" / "edgeq", "--help"], cwd=tmp_path))

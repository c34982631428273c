"""The layer contract of pyproject.toml ([tool.importlinter]) holds, and an import up the layers breaks it.

`lint-imports` run as a developer types it, from the repository root (it reads the source tree edgeq/), and on a
regular install of the working tree; the breaking import is planted in a copy of that install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.test_install import REPO, stage_install


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sysconfig.get_path("scripts")) / "lint-imports"
    assert exe.is_file(), f"{exe} missing: install the test extra (pip install -e '.[test]')"
    # lint-imports puts its working directory first on sys.path: run inside `tree`, it analyses that edgeq.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([exe, "--no-cache", "--no-logo", REPO / "pyproject.toml"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return stage_install(tmp_path_factory.mktemp("layers"))


def test_the_layer_contract_holds_from_the_repository_root():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 1 kept, 0 broken." in proc.stdout, proc.stdout


def test_the_layer_contract_holds_on_the_installed_package(staged):
    proc = lint_imports(staged)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 1 kept, 0 broken." in proc.stdout, proc.stdout


def test_an_import_up_the_layers_breaks_the_contract_naming_it(staged, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(staged, tree, ignore=shutil.ignore_patterns("__pycache__"))
    module = tree / "edgeq" / "backends" / "openvino.py"
    if not module.is_file():  # a backend may grow into a package
        module = module.with_suffix("") / "__init__.py"
    with module.open("a") as f:
        f.write("\nimport edgeq.tasks.export\n")
    proc = lint_imports(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Contracts: 0 kept, 1 broken." in proc.stdout, proc.stdout
    assert "edgeq.backends is not allowed to import edgeq.tasks" in proc.stdout, proc.stdout
    assert "edgeq.backends.openvino -> edgeq.tasks.export" in proc.stdout, proc.stdout

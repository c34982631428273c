# The two commands of the README. Both create .venv on first use and install edgeq into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where `make lint` builds and installs: build/ is git-ignored.
LINT_SRC := build/lint-src
LINT_SITE := build/layers

.PHONY: demo test install lint

$(BIN)/edgeq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dask]'
	@touch $@

install: $(BIN)/edgeq

demo: install
	$(BIN)/edgeq demo digits-demo.yaml

# The layer contract ([tool.importlinter] in pyproject.toml). grimp cannot see the packages that the editable
# install maps from outside edgeq/ (flows/, tasks/, backends/, calibration/), so it checks a regular install.
# That install is built from a fresh copy because setuptools' build/lib keeps modules deleted from the source,
# and lint-imports runs inside it because it puts its working directory first on sys.path (from the repository
# root it would read the source edgeq/, which lacks the mapped packages).
lint: install
	rm -rf $(LINT_SRC) $(LINT_SITE)
	mkdir -p $(LINT_SRC)
	cp -R pyproject.toml README.md edgeq flows tasks backends calibration $(LINT_SRC)/
	$(BIN)/pip install -q --no-index --no-deps --no-build-isolation --target $(LINT_SITE) ./$(LINT_SRC)
	cd $(LINT_SITE) && PYTHONPATH=. $(abspath $(BIN))/lint-imports --no-cache --no-logo $(CURDIR)/pyproject.toml

# Two pytest-xdist workers (fewer where fewer CPUs: tests/conftest.py), each on its own CPUs, module by module.
test: lint
	$(BIN)/python -m pytest -q --durations=15 -n auto --dist loadfile

# The two commands of the README. Both create .venv on first use and install edgeq into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint

$(BIN)/edgeq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dask]'
	@touch $@

install: $(BIN)/edgeq

demo: install
	$(BIN)/edgeq demo digits-demo.yaml

# The layer contract ([tool.importlinter] in pyproject.toml), read from the source tree edgeq/.
lint: install
	$(BIN)/lint-imports --no-cache

# Two pytest-xdist workers (fewer where fewer CPUs: tests/conftest.py), each on its own CPUs, module by module,
# the longest modules first (in the order tests/conftest.py collects them: --no-loadscope-reorder).
test: lint
	$(BIN)/python -m pytest -q --durations=15 -n auto --dist loadfile --no-loadscope-reorder

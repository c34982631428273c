# The two commands of the README. Both create .venv on first use and install edgeq into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/edgeq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dask]'
	@touch $@

install: $(BIN)/edgeq

demo: install
	$(BIN)/edgeq demo digits-demo.yaml

test: install
	$(BIN)/python -m pytest -q

# Two commands for a newcomer: `make demo` (set up, then train on MNIST-1D) and `make test` (set up, then test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,test,demo]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m recipes.mnist1d fit

lint: setup
	$(PY) -m ruff check lightning_fedhog recipes tests benchmarks

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs data .pytest_cache

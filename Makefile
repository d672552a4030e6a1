# `make demo` runs the main job on the shipped model; `make test` runs lint and the test suite.
# Both create .venv on first use (CPU build of torch 2.13.0 from PyPI's pin; see README).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,data,dev]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/lego-export --engines onnx --out engines/ --force
	$(PY) -m runtimes.sample --engine-dir engines/ --seeds 0-15 --out samples/
	$(PY) -m runtimes.sample --seeds 0-79 --class-rows --cfg-scale 2 --out samples/classes/

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

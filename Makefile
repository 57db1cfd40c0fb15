# Every target sets up what it needs on a fresh machine: the virtual environment,
# a Docker Engine (using the one that answers, or installing Debian's), and the images.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
IMAGES  ?= base builtin
PYTEST_ARGS ?=

.PHONY: all venv engine images test demo bench lint clean gc

all: test

$(STAMP): pyproject.toml
	@scripts/ensure-python.sh $(PY)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat: a plain path entry instead of setuptools' import-hook finder, which cost
	# ~10 ms of every `airlock` start (an installed, non-editable Airlock has neither).
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat \
	  || $(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

engine:
	@scripts/ensure-engine.sh

images: venv engine
	$(BIN)/airlock images build $(IMAGES)

test: images
	@scripts/ensure-test-tools.sh
	$(BIN)/pytest $(PYTEST_ARGS)

demo: images
	$(BIN)/python -m runner.demo

bench: images
	$(BIN)/python benchmarks/run_all.py

lint: venv
	$(BIN)/ruff check runner tests benchmarks
	$(BIN)/mypy

gc: venv
	$(BIN)/airlock gc

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

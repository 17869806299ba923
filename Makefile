# Two commands that work on a fresh machine:
#   make demo   set up .venv and run the main job (the demo on the built-in world)
#   make test   set up .venv and run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alignlab-installed

.PHONY: setup demo test test-all mutation clean

setup: $(STAMP)

# The CPU torch wheel on disk goes in first, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/alignlab demo

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

# Mutation testing of the numerical core (docs/mutation.md); e.g. MUTATE_ARGS="--sample 200 -j 2".
mutation: setup
	$(PY) tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

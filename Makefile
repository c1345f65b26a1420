# Two commands do everything on a fresh machine:
#   make demo   install into .venv, build the embedded data, train every model on it -> outputs/demo/
#   make test   install into .venv, run the tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

# Python bytecode is written once, into .venv/pycache, and read by every process after. Where the environment sets
# PYTHONDONTWRITEBYTECODE (container images often do), each process would otherwise compile torch, lightning and
# transformers from source again: `import torch, lightning` took 16 CPU-s here without bytecode and 7 with it, and
# the demo's stages and the tests' CLI runs are separate processes. The source tree gets no __pycache__ folders.
export PYTHONPYCACHEPREFIX := $(CURDIR)/$(VENV)/pycache
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test install clean bench

install: $(STAMP)

# (re)install whenever pyproject.toml changes; uv is bootstrapped with pip when absent (it is ~10x faster than pip
# at resolving torch and its CUDA wheels)
$(STAMP): pyproject.toml
	@$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q uv
	$(PY) -m uv venv -q --allow-existing --python $(PY) $(VENV)
	$(PY) -m uv pip install -q --python $(BIN)/python -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vidgen demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) outputs runs data/demo .pytest_cache

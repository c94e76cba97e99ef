# Two entry points: `make train` runs the main job, `make test` runs the whole suite
# (`make test-fast`: the tests that start no server, Ray instance or training run).
# Both build (or reuse) .venv first. torch is pinned and installed before anything that
# depends on it so pip takes the CPU wheel on disk instead of a multi-GB CUDA build;
# deepspeed is built against that torch (no build isolation) for the same reason.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q setuptools wheel ninja py-cpuinfo hjson psutil
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.19.8"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python jobs/train.py $(ARGS)

# The dashboard tests run Debian's Prometheus against a local Ray instance.
test: $(STAMP)
	command -v prometheus >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

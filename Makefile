# Two entry points: `make train` runs the main job, `make test` runs the whole suite
# (`make test-fast`: the tests that start no server, Ray instance or training run).
# Both build (or reuse) .venv first. torch is pinned and installed before anything that
# depends on it so pip takes the CPU wheel on disk instead of a multi-GB CUDA build;
# deepspeed is built against that torch (no build isolation) for the same reason, with its
# CPU shared-memory op compiled in (DS_BUILD_SHM_COMM=1): built just in time instead, it takes a
# lock file at each run's start, and a run killed there leaves the lock for every later run to
# wait on forever. A venv installed before that gets deepspeed reinstalled once (HAS_SHM_OP);
# --no-cache-dir keeps pip from reusing a wheel it cached without the op.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
HAS_SHM_OP := from deepspeed.git_version_info import installed_ops; assert installed_ops["deepspeed_shm_comm"]

.PHONY: setup train test test-fast

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q setuptools wheel ninja py-cpuinfo hjson psutil
	$(BIN)/python -c '$(HAS_SHM_OP)' 2>/dev/null || DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
	  $(BIN)/pip install -q --no-cache-dir --no-build-isolation --force-reinstall --no-deps "deepspeed==0.19.8"
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

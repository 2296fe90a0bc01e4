# One entry point. `make repro`, `make test`, `make test-all` and `make lint` each
# create/update the virtual environment first, so all work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Where torch comes from. Empty (default): pip's own configuration. On this project's
# machines and CI that serves the local CPU wheel. On a stock machine PyPI serves the
# multi-GB CUDA build, which is what a GPU machine wants; a CPU-only machine should use
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

# Offline and quiet: no telemetry, no analytics, no update checks.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export DVC_NO_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
# Stages run `python`: make it the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test test-all lint validate validate-baseline bench plots exps sweeps ui-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, so no later requirement can pull another build (see TORCH_INDEX).
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,team]'
	touch $(STAMP)

repro: setup
	$(BIN)/dvc repro

# Experiments side by side: the params and quality metrics that differ between them, as a
# Markdown table (no timing, dependency-hash or output-hash columns).
exps: setup
	$(BIN)/dvc exp show --no-pager --only-changed --md \
		--drop '.*_time_s|.*tokens_per_s|resumed_from_step|stopped_early|val_tokens|val_bytes|models|.*mlflow_run.*|(gptcore|stages|data)/.*'

# Every recipe-sweep run as a table made from MLflow (docs/sweeps.md): the runs of
# `python bench/recipe_sweep.py queue`, plus the rows measured before sweeps were DVC
# experiments (bench/sweep_*.jsonl, imported once into this project's store, tagged with
# the machine they ran on). Each row cites the `dvc exp run` command that redoes it.
sweeps: setup
	$(BIN)/python bench/recipe_sweep.py import --recipes bench/recipes.yaml bench/sweep_h200.jsonl --machine "1x NVIDIA H200, bf16, 12 runs at a time"
	$(BIN)/python bench/recipe_sweep.py import --recipes bench/recipes.yaml bench/sweep_cpu_zen3_bpe_fp32.jsonl bench/sweep_cpu_zen3_char_fp32.jsonl \
		--machine "2-core AMD EPYC Zen 3 (cpu family 25, model 1), float32"
	$(BIN)/python bench/recipe_sweep.py import --recipes bench/recipes.yaml bench/sweep_cpu_zen4_bpe_bf16.jsonl \
		--machine "2-core AMD EPYC Zen 4 (cpu family 25, model 17), bf16"
	$(BIN)/python bench/recipe_sweep.py import --recipes bench/recipes.yaml bench/sweep_cpu_char.jsonl --machine "2-core AMD EPYC with AVX-512 bf16, bf16"
	$(BIN)/python bench/recipe_sweep.py report --md docs/sweeps.md > /dev/null

# mlflow ui shows every run with its name, datasets and model, the training view (loss
# columns, sorted), and the registry's gptcore model with its champion alias and version
# tags (rendered in headless Chromium when installed, else through the REST API);
# screenshot: docs/mlflow_run.png.
ui-check: setup
	$(BIN)/python tests/ui_check.py

# The committed default run's curves beside the reference run (the recipe before Muon),
# from the metric files alone: docs/loss_curve.png, shown in the README.
plots: setup
	$(BIN)/python -m gptcore.plots --run "default (rotary, ReLU², smoothing, EMA)=metrics" \
		--run "Muon=docs/muon_run" --run "AdamW=docs/reference_run" -o docs/loss_curve.png

# The fast tier, for the edit-test loop: unit, parity, config, fast fault and CLI tests.
# Tests marked `slow` (real dvc repro / exp run, DDP, servers, registry, browser) are left
# to test-all. Extra pytest arguments: make test PYTEST_ARGS='-k loss'.
test: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Everything, as CI runs it; --durations names the slowest tests on every run.
test-all: setup
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# Pipeline validation for a pull request (docs/pipeline.md): the pipeline at a short setting in
# a temporary copy, against BASE's committed validation/; writes validation/ and validation.md,
# exits 1 when bits/byte is worse than BASE's by more than TOLERANCE.
BASE ?= main
VALIDATE_SET ?= train.max_steps=200
TOLERANCE ?= 0.05
validate: setup
	$(BIN)/python -m gptcore.validate --base $(BASE) $(foreach s,$(VALIDATE_SET),-S $(s)) --tolerance $(TOLERANCE)

# The first baseline (or a deliberate new one): run and write validation/, to commit.
validate-baseline: setup
	$(BIN)/python -m gptcore.validate --init $(foreach s,$(VALIDATE_SET),-S $(s))

bench: setup
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_tokenize.py
	$(BIN)/python bench/bench_ddp.py
	$(BIN)/python bench/bench_serve.py

clean-venv:
	rm -rf $(VENV)

# lmforge: `make train` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmforge-installed
ARGS   ?=
PORT   ?= 6006

.DEFAULT_GOAL := help
.PHONY: help setup train test test-fast lint format tensorboard bench clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv and install lmforge with its extras (dev, hf, lora, wandb, mlflow, optuna, datasets, stream) under the tested pins (no-op when up to date)

# The stream extra is litdata and what it imports, without the torchvision it lists: torchvision
# only serves litdata's image serializer, and the package indexes have no CPU build of it for the
# tested torch, while a CUDA build of it makes torchmetrics (so lightning) fail to import.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,hf,lora,wandb,mlflow,optuna,datasets]' boto3 obstore tifffile
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps litdata
	@touch $@

train: setup ## Train the default experiment (extra Hydra overrides: make train ARGS="trainer.max_steps=100")
	$(BIN)/lmforge train $(ARGS)

test: setup ## Run the whole test suite
	$(BIN)/python -m pytest $(ARGS)

test-fast: setup ## Run the tests that are not marked slow
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: setup ## ruff (lint and format check) and the import-layer contracts (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup ## Fix what ruff can: import order, formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

tensorboard: setup ## Serve logs/ with TensorBoard on http://127.0.0.1:$(PORT)
	$(BIN)/tensorboard --logdir logs --host 127.0.0.1 --port $(PORT)

bench: setup ## Run the benchmark suite (not part of make test)
	$(BIN)/python benchmarks/run_all.py $(ARGS)

clean: ## Remove the virtual environment and caches (keeps logs/ and data/)
	rm -rf $(VENV) .pytest_cache src/*.egg-info

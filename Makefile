# SortedServe — set-up, serve, test.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install run test lint format default-model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU wheel, so that the project's torch>= range installs nothing more
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/python -m app serve

lint: install
	$(BIN)/ruff check app tests
	$(BIN)/ruff format --check app tests

format: install
	$(BIN)/ruff check --fix app tests
	$(BIN)/ruff format app tests

test: install lint
	$(BIN)/python -m pytest -q

# Rebuild model_store/default (SoFT) and model_store/default-sft (SFT) from ../shared/data:
# pretrain a base, then fine-tune SoFT and SFT from it side by side (one CPU thread each).
DATA ?= ../shared/data
BUILD_DEFAULT := $(BIN)/python -m app build-default --data $(DATA) --out model_store --threads 1
default-model: install
	$(BUILD_DEFAULT) --stage pretrain
	$(BUILD_DEFAULT) --stage finetune --methods soft & pid=$$!; \
	  $(BUILD_DEFAULT) --stage finetune --methods sft; sft=$$?; wait $$pid && test $$sft -eq 0

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

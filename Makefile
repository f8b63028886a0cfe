# One command per stage; each reuses what is already done.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= tiny
DTYPE  ?= fp32
VIDEO  ?= samples/sample.mp4

EXPORT_FLAGS = --model $(MODEL) --dtype $(DTYPE) $(if $(OUT),--out $(OUT)) \
	$(if $(RANDOM_WEIGHTS),--random-weights) $(if $(FORCE),--force) $(if $(NO_VERIFY),--no-verify)

.PHONY: setup export check demo test bench soak gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[export,dev]'
	touch $@

export: setup
	$(BIN)/python -m export $(EXPORT_FLAGS)

check: setup
	$(BIN)/python -m export.check $(or $(GRAPHS),graphs/$(MODEL))

demo: setup
	$(BIN)/python -m export --model tiny
	$(BIN)/python -m runtime.sample $(VIDEO)
	$(BIN)/python -m runtime.stream $(VIDEO) --graphs graphs/tiny --out commentary.vtt

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pip install -q -e '.[export,dev,bench]'
	$(BIN)/python -m bench

soak: setup
	$(BIN)/python -m pip install -q -e '.[export,dev,bench]'
	$(BIN)/python -m bench.soak --minutes $(or $(MINUTES),60)

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf graphs/*/ samples/ commentary.vtt build/

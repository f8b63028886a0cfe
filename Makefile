# One command per stage; each reuses what is already done.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= tiny
DTYPE  ?= fp32
VIDEO  ?= samples/sample.mp4

EXPORT_FLAGS = --model $(MODEL) --dtype $(DTYPE) $(if $(OUT),--out $(OUT)) \
	$(if $(RANDOM_WEIGHTS),--random-weights) $(if $(FORCE),--force) $(if $(NO_VERIFY),--no-verify) \
	$(if $(QUANT),--quant $(QUANT)) $(if $(QUANT_FORM),--quant-form $(QUANT_FORM)) \
	$(if $(QUANT_BLOCK),--quant-block $(QUANT_BLOCK))

# llama.cpp (the bench's peer) is built from source by llama-cpp-python; its multimodal library is not used, so
# it is not built (the whole build: 7 minutes here on 2 cores).
BENCH_INSTALL = CMAKE_ARGS="-DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF $(CMAKE_ARGS)" \
	$(BIN)/python -m pip install -q -e '.[export,dev,bench]'

.PHONY: setup export check demo train-micro micro-accuracy test bench bench-full bench-streams bench-cluster soak gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[export,dev]'
	touch $@

export: setup
	$(BIN)/python -m export $(EXPORT_FLAGS)

check: setup
	$(BIN)/python -m export.check $(or $(GRAPHS),graphs/$(MODEL)$(if $(QUANT),-$(QUANT)))

# The built-in micro model (export/presets/micro, trained on runtime/world.py) on a clip of its world.
demo: setup
	$(BIN)/python -m export --model micro
	$(BIN)/python -m runtime.sample $(VIDEO) --world --seconds 30
	$(BIN)/python -m runtime.stream $(VIDEO) --graphs graphs/micro --out commentary.vtt \
		--questions $(basename $(VIDEO)).questions

# Retrain the micro model from scratch (seeded, 42 minutes and a 30-s check on 2 cores); prints held-out accuracy.
train-micro: setup
	$(BIN)/python -m export.train_micro --out export/presets/micro

# The micro model's accuracy through the ONNX runtime: five 10-minute streams with questions, first vs last minutes,
# the shuffled control.
micro-accuracy: setup
	$(BIN)/python -m export --model micro
	$(BIN)/python -m runtime.accuracy --graphs graphs/micro

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BENCH_INSTALL)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.streams

# The whole model (MODEL, default Qwen3-VL-4B, random weights) in int4 against llama.cpp Q4_0 of the same weights,
# timed in turn; not part of `make bench` (about an hour here the first time, mostly the export and the conversion).
bench-full: setup
	$(BENCH_INSTALL)
	$(BIN)/python -m bench.full $(if $(filter command line,$(origin MODEL)),--model $(MODEL))

# Only the "streams" section (batched decode steps, the server with N streams batched and unbatched).
bench-streams: setup
	$(BENCH_INSTALL)
	$(BIN)/python -m bench.streams

# The cluster (runtime.cluster on a local Ray) against the one-process server: throughput, lag, start-up, memory.
bench-cluster: setup
	$(BIN)/python -m bench.cluster

soak: setup
	$(BENCH_INSTALL)
	$(BIN)/python -m bench.soak --minutes $(or $(MINUTES),60)

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf graphs/*/ samples/ commentary.vtt build/

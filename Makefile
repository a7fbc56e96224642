# unclip-jax: every target creates .venv when it is missing and installs what it needs into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint fixtures bench scale-plan clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.stamp-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.stamp-parity: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,parity]'
	touch $@

## demo: the embedded default (configs/shapes_demo.py): builds shapes, trains a tiny unCLIP stack
## and GLIDE base on CPU, samples grids and runs an ablation into outputs/demo (~16 min on 2 cores;
## a rerun reuses the trained runs). `unclip-jax demo --toy` runs the diffusion-core toy demo.
demo: $(VENV)/.stamp-base
	$(BIN)/unclip-jax demo

## test: ruff, then pytest on 8 fake CPU devices in TEST_WORKERS processes (XLA compiles on one
## thread, so two workers use both cores); exit 5, "no tests collected", is not a failure
TEST_WORKERS ?= 2
test: $(VENV)/.stamp-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## fixtures: regenerate the parity fixtures with torch/diffusers/transformers (not needed by tests)
# The GLIDE fixtures (tests/fixtures/glide_tiny) need a glide-text2im source tree, so they are not
# in this target: $(BIN)/python tests/fixtures/make_glide_fixtures.py --glide-src DIR
fixtures: $(VENV)/.stamp-parity
	$(BIN)/python tests/fixtures/make_diffusion_fixtures.py
	$(BIN)/python tests/fixtures/make_unet_fixtures.py
	$(BIN)/python tests/fixtures/make_clip_fixtures.py
	$(BIN)/python tests/fixtures/make_prior_fixtures.py
	$(BIN)/python tests/fixtures/make_decoder_fixtures.py
	$(BIN)/python tests/fixtures/make_karlo_fixtures.py
	$(BIN)/python tests/fixtures/make_karlo_chain_fixtures.py
	$(BIN)/python tests/fixtures/make_torch_pickle_fixtures.py

## bench: the CPU set, side by side against the PyTorch reference (run it alone: the timing
## rules of benchmarks/harness.py wait for a quiet machine), JSON in benchmarks/results/, then
## the tables of docs/results.md rewritten from the JSON. ~40 min on 2 cores. `make scale-plan`
## (hours, AOT only) and benchmarks/gpu_suite.sh (a GPU) are apart.
bench: $(VENV)/.stamp-parity
	UNCLIP_JAX_COMPILATION_CACHE=off $(BIN)/python benchmarks/bench_samplers.py
	UNCLIP_JAX_COMPILATION_CACHE=off $(BIN)/python benchmarks/bench_karlo_small.py
	$(BIN)/python benchmarks/report.py

## scale-plan: paper-scale train steps AOT-compiled on 64 fake CPU devices (no weights), and
## Karlo's samplers' memory at batch 1 and 8, then their tables (docs/results.md, README)
scale-plan: $(VENV)/.stamp-base
	$(BIN)/python benchmarks/scale_plan.py
	$(BIN)/python benchmarks/karlo_memory.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

# The canonical commands. Each sets up what is missing first: a virtual environment in .venv,
# PyTorch's CPU build from the local wheel (never a bare `torch`, which pulls CUDA packages),
# the pinned dependencies, and the compiled extensions moefast._C and moefast._tower_ops (the
# editable build sees torch, so the C++ tower node is required here: MOEFAST_TOWER_OPS=ON).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
DEPS_STAMP  := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
NATIVE_SRC  := pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/ops/*.cpp)
BENCH_NAME  ?= cpu-$(shell uname -m)
BENCH_PATH  ?= bench/

.PHONY: setup run test check-install lint bench stubs clean sanitize golden golden-record gpu-check

setup: $(BUILD_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q $(TORCH) numpy
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SRC)
	$(BIN)/pip install -q --no-build-isolation --no-deps -Ccmake.define.MOEFAST_TOWER_OPS=ON -e .
	touch $@

run: setup
	$(BIN)/moefast train $(ARGS)

lint: setup
	$(BIN)/ruff check moefast kernels tests bench
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q tests

# The slow packaging checks (a few minutes): `python -m build` and `pip install .` / `-e .` with
# default build isolation, each installed offline into a fresh venv and trained from outside the
# checkout; the tower tests against the isolated wheel (which has no C++ tower node).
check-install: setup
	$(BIN)/python -m pytest -q -m install tests/test_install.py

# ASan + UBSan, not part of `make test` (about 5 minutes, most of it compiling): the extensions
# rebuilt with -DMOEFAST_SANITIZE=ON in their own build directory (the installed ones are not
# touched), then the engine, fuzz, tower and dropout tests run against them; any sanitizer
# report fails it. How ASan runs inside the uninstrumented Python, and why nothing is
# suppressed: tools/sanitize/run.sh.
SANITIZE_DIR   := build/sanitize
SANITIZE_TESTS := tests/test_embedding.py tests/test_embedding_inputs.py tests/test_embedding_safety.py \
                  tests/test_embedding_fuzz.py tests/test_embedding_half.py tests/test_tower_cpu.py tests/test_dropout.py
sanitize: setup
	cmake -S . -B $(SANITIZE_DIR) -DMOEFAST_SANITIZE=ON -DMOEFAST_TOWER_OPS=ON -DPython_EXECUTABLE=$(abspath $(BIN)/python)
	cmake --build $(SANITIZE_DIR) -j2
	tools/sanitize/run.sh $(SANITIZE_DIR) $(SANITIZE_TESTS)

# The golden runs (tools/golden, docs/reliability.md "Golden runs"), not part of `make test`
# (about a minute on 2 cores): tiny runs with every protocol option explicit, at one thread,
# compared bitwise key by key with tools/golden/reference.json. Run it before every push of a
# behaviour-preserving commit; `make golden-record` rewrites the reference, only in a commit
# whose message names the intended behaviour change.
golden: setup
	OMP_NUM_THREADS=1 $(BIN)/python tools/golden/golden.py check

golden-record: setup
	OMP_NUM_THREADS=1 $(BIN)/python tools/golden/golden.py record

bench: setup
	mkdir -p bench/results
	$(BIN)/python -m pytest $(BENCH_PATH) --benchmark-only --benchmark-json=bench/results/$(BENCH_NAME).json $(ARGS)

# The day a GPU is lent (issue 27): build into the running Python (the GPU image's torch, not the
# CPU venv), every gpu-marked test, the GPU benchmarks, and OUT/summary.md; each part under its
# own time limit, the whole under 8 minutes on one H100. Without CUDA: one line, exit 0.
OUT ?= gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py $(OUT)

stubs: setup
	$(BIN)/python -m nanobind.stubgen -q -m moefast._C -o moefast/_C.pyi

clean:
	rm -rf build $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Set-up and the everyday commands; each builds what it needs first, in ./.venv.
#   make demo    the main job: trains the small FNeVR on the embedded synthetic talking-head set
#                (CPU, a few minutes, no downloads); writes runs/demo/
#   make test    the tests (Python, with Triton through its interpreter when there is no GPU, in
#                TEST_WORKERS=2 processes; and the C++ tests of the shared kernel math through CMake/ctest)
#   make bench   the benchmarks of every registered op (fnevr/ops/_registry.py)
#   make lint    ruff (lint and format), clang-format over csrc/, mypy; CI runs it before the tests
#   make wheel   a release wheel in dist/: the CPU kernels and the CUDA kernels for every GPU from
#                Ampere to Blackwell (setup.py's RELEASE_ARCHS; FNEVR_BUILD_CUDA=0: CPU only), built
#                against .venv's torch, which its metadata pins
#   make wheel-check   installs the newest dist/ wheel into a fresh venv (build/wheel-venv) where no
#                compiler can be found, and runs tests/wheel_smoke.py there
# FNEVR_BUILD_CUDA=1|0 forces the CUDA extension on or off (default: only where a GPU is present;
# CI forces it on, so every CUDA source is compiled there).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fnevr-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.cu)
PACKAGES := torch==2.14.1 torchvision==0.29.1 numpy pyyaml imageio imageio-ffmpeg tqdm torchmetrics tensorboard \
	"opencv-python-headless<5" pytest pytest-xdist pytest-benchmark ninja matplotlib scikit-image \
	onnx onnxscript onnxruntime
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

# The style checkers, pinned so every machine reports the same (make lint; .pre-commit-config.yaml runs them too).
LINT_TOOLS := ruff==0.17.6 mypy==2.4.1 clang-format==23.1.5 pre-commit==4.7.0
LINT_STAMP := $(VENV)/.fnevr-lint-tools
CXX_SOURCES := $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.cu tests/cpp/*.h tests/cpp/*.cpp)

.PHONY: demo bench test lint wheel wheel-check

# Each step says what it does and how long it took (pip's own output is quiet; --no-compile: the
# modules used are byte-compiled on first import instead of all of torch's up front).
$(STAMP): $(SOURCES)
	@echo "make: [1/2] installing torch and the other dependencies into $(VENV) ..."
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install -q --no-compile $(PACKAGES) 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	echo "make: [1/2] done in $$(( $$(date +%s) - start )) s"
	@echo "make: [2/2] building fnevr: its C++ extension, and the CUDA one where a GPU is present or FNEVR_BUILD_CUDA=1 ..."
	@start=$$(date +%s); \
	rm -f fnevr/_C*.so; \
	$(BIN)/pip install -q --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	echo "make: [2/2] done in $$(( $$(date +%s) - start )) s; built: $$(find fnevr -maxdepth 1 -name "_C*.so" -newermt "@$$start" -printf "%f " | sed "s/\.[^ ]*//g")"
	@touch $@

$(LINT_STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --no-compile $(LINT_TOOLS) 2>&1 | { grep -v "^WARNING: Location" || true; }
	@touch $@

# mypy reads torch's and triton's types, so the package is installed first.
lint: $(STAMP) $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run --Werror $(CXX_SOURCES)
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/fnevr train --demo

# No build isolation: an isolated build would fetch its own torch (several GB) and pin that one.
# build/lib.* is cleared so that no module of an earlier build (another tag or arch list) is packed.
wheel: $(STAMP)
	@start=$$(date +%s); rm -rf build/lib.* build/bdist.*; \
	FNEVR_BUILD_CUDA=$${FNEVR_BUILD_CUDA:-1} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-release} \
		$(BIN)/pip wheel -q --no-build-isolation --no-deps -w dist . 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	echo "make: wheel built in $$(( $$(date +%s) - start )) s: $$(ls -t dist/*.whl | head -1)"

# Compilers are shadowed by stubs that fail, so nothing can be built on the way.
NO_COMPILER := build/no-compiler
wheel-check:
	@wheel=$$(ls -t dist/*.whl 2>/dev/null | head -1); test -n "$$wheel" || { echo "make: no wheel in dist/: run make wheel"; exit 1; }; \
	start=$$(date +%s); rm -rf build/wheel-venv $(NO_COMPILER); mkdir -p $(NO_COMPILER); \
	for c in cc gcc g++ c++ clang clang++ nvcc; do \
		printf '#!/bin/sh\necho "$$0: no compiler on this machine" >&2; exit 1\n' > $(NO_COMPILER)/$$c; chmod +x $(NO_COMPILER)/$$c; \
	done; \
	export PATH=$(abspath $(NO_COMPILER)):$$PATH CC=false CXX=false; \
	$(PYTHON) -m venv build/wheel-venv; \
	build/wheel-venv/bin/pip install -q --no-compile "$$wheel" 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	echo "make: installed $$wheel into build/wheel-venv in $$(( $$(date +%s) - start )) s"; \
	cd /tmp && $(abspath build/wheel-venv/bin/python) $(abspath tests/wheel_smoke.py)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Two pytest workers (pytest-xdist; TEST_WORKERS=1 runs them in one process): on CI's 2 cores the
# suite takes about two thirds of the time, as much of it is Python that one core runs alone.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)
	mkdir -p build
	cmake -S . -B build/cmake -DPython_EXECUTABLE=$(abspath $(BIN)/python) > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j2 >> build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	ctest --test-dir build/cmake --output-on-failure

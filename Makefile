# Set-up and the everyday commands; each builds what it needs first, in ./.venv.
#   make demo    the main job: trains the small FNeVR on the embedded synthetic talking-head set
#                (CPU, a few minutes, no downloads); writes runs/demo/
#   make test    the tests (Python, with Triton through its interpreter when there is no GPU,
#                and the C++ tests of the shared kernel math through CMake/ctest)
#   make bench   the op benchmarks (compositing, grid sample, SPADE norm)
# FNEVR_BUILD_CUDA=1|0 forces the CUDA extension on or off (default: only where a GPU is present;
# CI forces it on, so every CUDA source is compiled there).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fnevr-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
PACKAGES := torch==2.14.1 torchvision==0.29.1 numpy pyyaml imageio imageio-ffmpeg tqdm torchmetrics tensorboard \
	pytest pytest-benchmark ninja matplotlib
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: demo bench test

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
	$(BIN)/pip install -q --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	echo "make: [2/2] done in $$(( $$(date +%s) - start )) s; built: $$(find fnevr -maxdepth 1 -name "_C*.so" -newermt "@$$start" -printf "%f " | sed "s/\.cpython[^ ]*//g")"
	@touch $@

demo: $(STAMP)
	$(BIN)/fnevr train --demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py composite grid_sample spade_norm

test: $(STAMP)
	$(BIN)/python -m pytest
	mkdir -p build
	cmake -S . -B build/cmake -DPython_EXECUTABLE=$(abspath $(BIN)/python) > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j2 >> build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	ctest --test-dir build/cmake --output-on-failure

# Set-up and the everyday commands; each builds what it needs first, in ./.venv.
#   make demo    the main job: trains the small FNeVR on the embedded synthetic talking-head set
#                (CPU, a few minutes, no downloads); writes runs/demo/
#   make test    the tests (Python, with Triton through its interpreter when there is no GPU,
#                and the C++ tests of the shared kernel math through CMake/ctest)
#   make bench   the op benchmarks (compositing, grid sample, SPADE norm)
# FNEVR_BUILD_CUDA=1|0 forces the CUDA extension on or off (default: when torch has CUDA and nvcc).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fnevr-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: demo bench test

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 numpy pyyaml imageio imageio-ffmpeg tqdm torchmetrics tensorboard \
		pytest pytest-benchmark ninja matplotlib
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

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

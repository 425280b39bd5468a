# make demo   install everything (torch included) into .venv, build, run the demo
# make test   install everything, build (CPU + CUDA kernels when a toolkit exists), run the tests
# make bench  full benchmarks (tens of minutes); make bench-quick: a few seconds each (CI)
# make test-avx2  the kernel tests again with the CPU kernels capped at AVX2 (a CPU without AVX-512)
# make test-cuda-emulated  the CUDA kernels run on the CPU by the emulator at
#             $(DISTILLKIT_CUDAEMU) (default ../shared/cudaemu), compared with the CPU kernels
PYTHON_BIN ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch guesses the CUDA home from the nvcc on PATH, which may be a wrapper script.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export MAX_JOBS ?= 2

.PHONY: install build test test-avx2 test-cuda-emulated demo bench bench-quick clean

$(VENV)/.deps: requirements.txt
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.deps

# Rebuilt only when a source, setup.py or the environment changed (bench-quick after test
# reuses the build).
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
BUILD_STAMP := build.log

$(BUILD_STAMP): $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation -v -e . > build.tmp.log 2>&1 || (tail -60 build.tmp.log; exit 1)
	mv build.tmp.log $@

build: $(BUILD_STAMP)
	grep "distillkit build:" $(BUILD_STAMP)
	$(PY) -c "import distillkit, distillkit._C as c; print('distillkit built: with_cuda =', c.with_cuda)"

test: build
	$(PY) -m pytest -q tests

# The tests of every kernel file, the CPU kernels run at the avx2 level whatever the CPU has
# (test_cpu_capability.py runs a sample of them at every level).
KERNEL_TESTS := tests/test_kd_loss.py tests/test_kd_single_pass.py tests/test_slam_loss.py \
	tests/test_sparse_kd.py tests/test_sparse_tail.py tests/test_distance.py \
	tests/test_coordinate_lstm.py tests/test_fused_linear.py tests/test_extreme_scalars.py \
	tests/test_extreme_scalars_linear.py tests/test_sparse_extreme_scalars.py \
	tests/test_extreme_scalars_slam_distance.py

test-avx2: build
	DISTILLKIT_CPU_CAPABILITY=avx2 $(PY) -m distillkit info | grep "^CPU level"
	DISTILLKIT_CPU_CAPABILITY=avx2 $(PY) -m pytest -q $(KERNEL_TESTS)

DISTILLKIT_CUDAEMU ?= ../shared/cudaemu

# A development tool, not a dependency: without it the target says so and succeeds.
test-cuda-emulated: build
	@if [ -f "$(DISTILLKIT_CUDAEMU)/run.py" ]; then \
	  $(PY) $(DISTILLKIT_CUDAEMU)/run.py --csrc csrc --cases tests/cuda_emulated/cases.py; \
	else \
	  echo "test-cuda-emulated: skipped, no CUDA emulator at $(DISTILLKIT_CUDAEMU)/run.py (set DISTILLKIT_CUDAEMU)"; \
	fi

demo: build
	$(PY) -m distillkit demo

bench: build
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

bench-quick: build
	for f in benchmarks/bench_*.py; do $(PY) $$f --quick || exit 1; done

clean:
	rm -rf build build.log *.egg-info distillkit/_C*.so

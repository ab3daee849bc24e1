# raytune_ft — the README's commands. `make demo` and `make test` install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rtf-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast lint bench bench-estimate bench-checkpoint-io bench-gpu image clean gpu-wheelhouse gpu-check gpu-check-dry

install: $(STAMP)

# Re-runs only when the dependency declarations change. torch is pinned through constraints.txt, so
# installing the project never swaps it for another build. On Linux, PyPI's torch is the CUDA build
# (several GB); a CPU-only machine takes the CPU build: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt "torch==2.13.0"$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX))
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(PY) -m raytune_ft.data.quickstart data/quickstart
	$(VENV)/bin/rtf submit jobspecs/quickstart.yaml
	$(VENV)/bin/rtf generate jobspecs/quickstart.yaml --temperature 0.2 --max-new-tokens 64 \
	  --prompt 'Write a Python function `clamp(value, lo, hi)` that: Return value limited to the range [lo, hi].' 

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not ray"

lint: install
	$(VENV)/bin/ruff check raytune_ft tests bench
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layout.py  # layers, cycles, run-dir names, sizes

# make bench BENCH_ARGS=--update-docs (on a quiet machine) also writes the quickstart figures into
# bench/RESULTS.md and README.md
BENCH_ARGS ?=
bench: install
	$(PY) bench/run_all.py $(BENCH_ARGS)

# rtf plan's time estimate against measured training time on this CPU (bench/estimate_check.py says how)
bench-estimate: install
	$(PY) bench/estimate_check.py

# a 1.6 GB full fine-tuning checkpoint to SeaweedFS on 127.0.0.1: upload, training stall, pull and resume (~5 min)
bench-checkpoint-io: install
	$(PY) bench/checkpoint_io.py

bench-gpu: install
	$(PY) bench/gpu.py

# ---- GPU readiness check (issue 14; bench/gpu_check.py says what each part measures)
# Here (CPU, PyPI): download what the GPU machine lacks into .whl1/ (part 1) and .whl2/ (part 2), each < 60 MiB.
gpu-wheelhouse: install
	$(PY) bench/gpu_wheelhouse.py

# There (the GPU machine: python3 with torch + CUDA, no network): install the part's folder offline into
# /tmp/site, then run the part. No venv, no index: everything else is the machine's own. PART=1 or 2.
PART ?= 1
GPU_PYTHON ?= python3
gpu-check:
	bash bench/gpu_install.sh .whl$(PART)
	PYTHONPATH=/tmp/site:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
	  $(GPU_PYTHON) bench/gpu_check.py --part $(PART) --out $${OUT:-bench/out}

# Here and in CI: the same script with every GPU step replaced by its plan (both parts).
gpu-check-dry: install
	$(PY) bench/gpu_check.py --dry-run

image:
	docker build -f docker/Dockerfile -t raytune-ft:latest .
	docker build -f docker/Dockerfile.cpu -t raytune-ft:cpu .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache rtf_runs data/quickstart

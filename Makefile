# raytune_ft — the README's commands. `make demo` and `make test` install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rtf-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast lint bench bench-gpu image clean

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

bench: install
	$(PY) bench/run_all.py

bench-gpu: install
	$(PY) bench/gpu.py

image:
	docker build -f docker/Dockerfile -t raytune-ft:latest .
	docker build -f docker/Dockerfile.cpu -t raytune-ft:cpu .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache rtf_runs data/quickstart

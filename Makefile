# Two commands: `make test` (the test suite) and `make demo` (the main job). Each bootstraps
# .venv on a fresh machine. torch comes from the local wheel cache under this machine's pip cap.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint venv clean gpu-check

# A contributor's one-command check on any CUDA machine (torch and triton installed, no .venv
# needed): build the CUDA extension, run the test suite on CUDA and `bnkernels bench --quick`,
# within 8 minutes; summary and archives under build/gpu-check/ and $(OUT) if set. Not tied to
# the venv. See docs/benchmarks.md, "The GPU check".
GPU_PYTHON ?= $(shell for p in python3 python; do $$p -c 'import torch' >/dev/null 2>&1 && \
                echo $$p && break; done)

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,experiments]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/bnkernels reproduce --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check bnkernels tests

gpu-check:
	@test -n "$(GPU_PYTHON)" || { echo "gpu-check: no python with torch on PATH (set GPU_PYTHON=...)"; exit 1; }
	$(GPU_PYTHON) tools/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info

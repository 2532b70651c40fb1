# Two commands: `make test` (the test suite) and `make demo` (the main job). Each bootstraps
# .venv on a fresh machine. torch comes from the local wheel cache under this machine's pip cap.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint venv clean

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

clean:
	rm -rf $(VENV) build *.egg-info

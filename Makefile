# Two commands set everything up on a fresh machine:
#   make demo   create .venv, generate a sample pair, register it, print where the outputs are
#   make test   the same environment, all tests (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch comes pinned: on the project's machines this version is a local CPU wheel; elsewhere pip picks the
# platform's build. Inside Slicer torch comes from the PyTorch extension instead (see README).
TORCH  ?= torch==2.13.0

.PHONY: demo test venv benchmark clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/deepdiffreg demo --out demo-output

test: venv
	$(PY) -m pytest -q Testing

benchmark: venv
	$(VENV)/bin/deepdiffreg benchmark --data ../shared/data --out docs/benchmarks.md

clean:
	rm -rf $(VENV) demo-output

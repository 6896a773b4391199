# nextword: developer entry points.
#
#   make venv        .venv with everything (training + serving + dev tools)
#   make serve       serve models/ on http://127.0.0.1:8000 from a torch-free .venv-serve
#   make test        the whole test suite (installs redis-server/prometheus/chromium when it can)
#   make test-quick  the suite without the slow tests
#   make lint        ruff
#   make bench       the serving benchmark (BENCH_ARGS=... to pass options)
#   make demo-png    retake docs/demo.png (the keyboard page in headless Chromium)

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV ?= .venv
SERVE_VENV ?= .venv-serve
PY := $(VENV)/bin/python
PIP_FLAGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
MODEL_REPOSITORY ?= models
HOST ?= 127.0.0.1
PORT ?= 8000

# Modules the full environment must provide; when one is missing `make venv` (re)installs.
VENV_CHECK := import torch, onnx, onnxruntime, fastapi, uvicorn, numpy, orjson, prometheus_client, redis, pydantic_settings, pytest, pytest_timeout, httpx, hypothesis, yaml, kubernetes_validate, selenium, schemathesis
SYSTEM_PACKAGES := redis-server prometheus chromium chromium-driver
# The project's own packages present in the tree; each must be importable from outside it (an
# editable install made before a package existed does not know it: it is then reinstalled).
PACKAGES := $(patsubst %/__init__.py,%,$(wildcard nextword/__init__.py service/__init__.py training/__init__.py benchmarks/__init__.py))
PACKAGES_CHECK := import importlib.util as u, sys; sys.exit(any(u.find_spec(p) is None for p in '$(PACKAGES)'.split()))

.PHONY: help venv ensure-venv serve test test-quick lint format bench demo-png system-deps clean

help:
	@sed -n '3,10p' Makefile | sed 's/^# \{0,1\}//'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Always (re)installs: `make venv` is how pyproject.toml changes reach the environment.
venv: $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[train,dev]'

# Used by the targets below: install only when the venv is missing or incomplete, so an
# existing environment is reused as it is (no network needed).
ensure-venv:
	@if [ ! -x "$(PY)" ] || ! "$(PY)" -c "$(VENV_CHECK)" >/dev/null 2>&1; then \
		echo "== $(VENV) missing or incomplete: running make venv"; \
		$(MAKE) --no-print-directory venv; \
	elif ! (cd / && "$(abspath $(PY))" -c "$(PACKAGES_CHECK)") >/dev/null 2>&1; then \
		echo "== installing the project itself (editable, no dependencies) into $(VENV)"; \
		"$(PY)" -m pip install --quiet --no-deps --no-build-isolation -e . \
			|| echo "== editable install failed: console scripts unavailable, tests run from the source tree"; \
	fi

$(SERVE_VENV)/.installed: pyproject.toml
	@[ -x "$(SERVE_VENV)/bin/python" ] || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install $(PIP_FLAGS) -e .
	@touch $@

# The torch-free serving install, as in the container.
serve: $(SERVE_VENV)/.installed
	NEXTWORD_MODEL_REPOSITORY=$(MODEL_REPOSITORY) NEXTWORD_HOST=$(HOST) NEXTWORD_PORT=$(PORT) \
	NEXTWORD_SESSION_STORE=memory $(SERVE_VENV)/bin/nextword-serve

# redis-server, prometheus and chromium (+ its chromedriver) are needed by the end-to-end tests
# (they skip without them).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "== installing$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); \
	else \
		echo "== not installed:$$missing (needs root and apt-get); the tests that need them will skip"; \
	fi

test: ensure-venv system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: ensure-venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: ensure-venv
	$(PY) -m ruff check .

format: ensure-venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: ensure-venv
	$(PY) -m benchmarks $(BENCH_ARGS)

# Retake docs/demo.png (the keyboard page in headless Chromium, from its browser test).
demo-png: ensure-venv
	NEXTWORD_UPDATE_DEMO_PNG=1 $(PY) -m pytest -q tests/test_keyboard_page.py -k typing

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv*' -prune -exec rm -rf {} +

# braze_assets: `make demo` runs every sync on the embedded default; `make test` runs the tests;
# `make lint` checks style, formatting and types.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The lock: every runtime, test, dev and deploy dependency pinned with hashes, for Python 3.11 on Linux x86_64.
LOCK := requirements.lock
LOCK_PLATFORM := --python-version 3.11 --python-platform x86_64-unknown-linux-gnu

.PHONY: setup lock demo ui emulator lint test clean

# Exactly the locked versions (hash-checked), then the project itself, built with the locked setuptools.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# Regenerate the lock from pyproject.toml (runtime deps + the test, dev and deploy extras), then install it.
# Pins already in the lock are kept where pyproject.toml still allows them; to upgrade, pass uv's
# flags: `make lock UPGRADE=--upgrade` (everything) or `make lock UPGRADE="--upgrade-package dagster"`.
UPGRADE ?=
lock: $(VENV)/.installed  ## regenerate requirements.lock from pyproject.toml, then install it
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra dev --extra deploy --generate-hashes \
		--custom-compile-command "make lock" \
		$(LOCK_PLATFORM) --quiet $(UPGRADE) -o $(LOCK)
	$(MAKE) setup

demo: setup  ## seed DuckDB, start the Braze emulator, run every sync, show what it did
	$(VENV)/bin/braze-assets demo

ui: setup  ## the same setup, then the Dagster UI on http://127.0.0.1:3000
	$(VENV)/bin/braze-assets ui

emulator: setup  ## a standalone Braze emulator on http://127.0.0.1:4545
	$(VENV)/bin/braze-emulator

LINTED := braze_assets braze_assets_tests benchmarks
lint: setup  ## ruff (lint and format) and mypy (the engine strictly typed), as CI runs them
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

test: setup  ## the test suite (what CI runs); installs PostgreSQL (Redshift tests) and Chromium (UI test) if missing
	scripts/ensure-postgres
	scripts/ensure-chromium
	$(PY) -m pytest

clean:
	rm -rf .braze_assets

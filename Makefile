# braze_assets: `make demo` runs every sync on the embedded default; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup demo ui emulator test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup  ## seed DuckDB, start the Braze emulator, run every sync, show what it did
	$(VENV)/bin/braze-assets demo

ui: setup  ## the same setup, then the Dagster UI on http://127.0.0.1:3000
	$(VENV)/bin/braze-assets ui

emulator: setup  ## a standalone Braze emulator on http://127.0.0.1:4545
	$(VENV)/bin/braze-emulator

test: setup  ## the test suite (what CI runs); installs PostgreSQL for the Redshift tests if missing
	scripts/ensure-postgres
	$(PY) -m pytest

clean:
	rm -rf .braze_assets

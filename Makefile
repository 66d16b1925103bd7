# The two commands of the README: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export MLFLOW_DISABLE_TELEMETRY := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install browser check nbtest pytest export readme docs lab clean-nbs down status bench help

help:
	@echo "make demo   - install, bring up the whole system on embedded services, print the URLs"
	@echo "make test   - install, check notebooks and package are in sync, build the docs, run nbdev_test and pytest"
	@echo "make down   - stop everything 'make demo' started"
	@echo "make bench  - run the scorer benchmark (figures printed)"
	@echo "make lab    - JupyterLab on nbs/, wired to the running embedded stack (starts its core services)"
	@echo "make docs   - build the documentation site from nbs/ and docs/ into _docs/"
	@echo "make export - notebooks -> fraud_nb/, clean the notebooks, README.md from nbs/index.ipynb"

$(STAMP): settings.ini setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fraud_nb)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the dashboard's browser tests (Playwright drives it; no browser download).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing Debian chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

demo: install
	$(BIN)/fraud-nb up --demo

down:
	@test -x $(BIN)/fraud-nb && $(BIN)/fraud-nb down || true

status: install
	$(BIN)/fraud-nb status

bench: install
	$(BIN)/fraud-nb bench

export: install
	cd nbs && ../$(BIN)/nbdev_export && ../$(BIN)/nbdev_clean
	$(PY) docs/build.py readme

# README.md is generated from nbs/index.ipynb (the site's home page): edit the notebook.
readme: install
	$(PY) docs/build.py readme

# The site: Sphinx + MyST-NB from nbs/ and docs/ into _docs/ (no Quarto, notebooks not executed).
docs: install
	$(PY) docs/build.py

# JupyterLab on nbs/ against the running embedded stack (its core services are started if they are not up).
lab: install
	$(PY) -m fraud_nb.lab

# Notebooks are the source: fail if exporting would change fraud_nb/ or if a notebook is not clean.
check: install
	$(PY) .ci/check_sync.py

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing

# Two workers, a test file each (its module fixtures stay in one process; tests/conftest.py groups the heavy and the
# timed files so they never overlap); each worker starts its own embedded stack.
# Most tests wait on streams and services, so two files at a time roughly halve the suite's wall time on 2 cores.
pytest: install browser
	$(BIN)/pytest -n 2 --dist loadgroup

test: install browser check docs nbtest pytest

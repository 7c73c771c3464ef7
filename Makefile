# make study   set up, run the d2l protocol, write its report
# make test    set up, run the test suite
# make ui      serve the MLflow UI of the SQLite store on http://127.0.0.1:$(PORT) (default 5000)
# make server  PostgreSQL + MLflow tracking server on http://127.0.0.1:$(PORT), one at a time with ui
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOCOL ?= protocols/d2l-dropout.yaml
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PORT ?= 5000

.PHONY: setup data study run report test bench ui server postgres clean-store

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) data

# Installs Debian's dataset-fashion-mnist when no copy is found and we may use apt.
data: $(STAMP)
	@if [ -z "$$STUDY_DATA_DIR" ] && [ ! -e $(DEBIAN_DATA) ] && [ ! -e data/FashionMNIST/raw/train-images-idx3-ubyte ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist"; \
	  apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	fi
	$(BIN)/python -m study data

study: setup
	$(BIN)/python -m study run $(PROTOCOL)
	$(BIN)/python -m study report $(PROTOCOL)

run: setup
	$(BIN)/python -m study run $(PROTOCOL)

report: $(STAMP)
	$(BIN)/python -m study report $(PROTOCOL)

# The integration tests start their own PostgreSQL, so the package must be there.
test: setup postgres
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m study.bench

ui: $(STAMP)
	@echo "Runs of $(PROTOCOL): $$(PORT=$(PORT) MLFLOW_TRACKING_URI= $(BIN)/python -m study url $(PROTOCOL) 2>/dev/null)"
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --host 127.0.0.1 --port $(PORT) --workers 1

# Installs Debian's postgresql when no server binaries are found and we may use apt.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's postgresql"; \
	    apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }; \
	  else echo "PostgreSQL not found: apt-get install postgresql (the integration tests need it)"; fi; \
	fi

server: $(STAMP) postgres
	$(BIN)/python -m study.server --port $(PORT)

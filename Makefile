# make study   set up, run the d2l protocol, write its report
# make test    set up, run the test suite
# make ui      serve the MLflow UI on http://127.0.0.1:5000
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOCOL ?= protocols/d2l-dropout.yaml
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data study run report test bench ui clean-store

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

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m study.bench

ui: $(STAMP)
	@echo "Runs of $(PROTOCOL): $$($(BIN)/python -m study url $(PROTOCOL) 2>/dev/null)"
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --host 127.0.0.1 --port 5000 --workers 1

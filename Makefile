# make study   set up, run the d2l protocol, write its report
# make paper   set up, run every protocol of the lesson, write one paper (reports/lesson/)
# make test    set up, run the test suite
# make ui      serve the MLflow UI of the SQLite store on http://127.0.0.1:$(PORT) (default 5000)
# make server  PostgreSQL + MLflow tracking server on http://127.0.0.1:$(PORT), one at a time with ui
# make gpu-check  determinism modes on cuda, CPU vs GPU, batched throughput: one table, also in
#              $(GPU_CHECK_OUT)/ (no GPU: the CPU parts run, the rest is named as skipped);
#              on a lent GPU machine: make gpu-pack here, then docs/gpu-check.md has the call
# make chaos   fault campaign on the smoke protocol: FAULT=driver|worker|server|node, BACKEND=local|ray,
#              TRIES=10 (node: BACKEND=ray); one line per try, exit 1 on any run lost or
#              duplicated, or process left behind
SHELL := /bin/bash
# An offline research harness has nothing to report to MLflow's telemetry service.
export MLFLOW_DISABLE_TELEMETRY := true
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOCOL ?= protocols/d2l-dropout.yaml
LESSON ?= protocols/lesson.yaml
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PORT ?= 5000
# Where `make server` keeps its PostgreSQL cluster and artifacts.
SERVER_STORE ?= mlruns
GPU_CHECK_OUT ?= reports/gpu-check

.PHONY: setup data browser study paper run report test bench gpu-check gpu-pack ui server postgres \
	clean-store chaos

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

# Debian's Chromium for the browser test of the UI (Playwright's own browser download needs the
# internet). Part of `make test`'s set-up, not `make study`'s: only the UI test needs a browser.
# Installed when missing and we may use apt; without it that one test skips (fails under CI=true).
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's chromium"; \
	  apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	fi

study: setup
	$(BIN)/python -m study run $(PROTOCOL)
	$(BIN)/python -m study report $(PROTOCOL)

# Prints its time estimate before running; finished cells are never rerun.
paper: setup
	$(BIN)/python -m study paper $(LESSON)

run: setup
	$(BIN)/python -m study run $(PROTOCOL)

report: $(STAMP)
	$(BIN)/python -m study report $(PROTOCOL)

# The integration tests start their own PostgreSQL (so the package must be there) and their own
# local Ray cluster (Ray comes with requirements.txt).
test: setup browser postgres
	$(BIN)/python -m pytest -q

FAULT ?= driver
BACKEND ?= local
TRIES ?= 10
chaos: setup postgres
	$(BIN)/python -m study.tools.chaos protocols/smoke.yaml --fault $(FAULT) --backend $(BACKEND) \
	  --tries $(TRIES) --set data.train_subset=1000 --set training.epochs=1

bench: setup
	$(BIN)/python -m study.tools.bench

# Imports only torch, numpy and the standard library (a lent GPU machine has no more).
gpu-check: setup
	$(BIN)/python -m study.tools.gpu_check --out $(GPU_CHECK_OUT)

# The four Fashion-MNIST .gz files (29 MiB) in data/gpu-pack/, which a GPU machine without
# network reads through STUDY_DATA_DIR; the device call carries this folder.
gpu-pack: setup
	$(BIN)/python -m study.tools.gpu_check --pack data/gpu-pack

ui: $(STAMP)
	$(BIN)/python -m study ui $(PROTOCOL) --port $(PORT)

# Installs Debian's postgresql when no server binaries are found and we may use apt.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's postgresql"; \
	    apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }; \
	  else echo "PostgreSQL not found: apt-get install postgresql (the integration tests need it)"; fi; \
	fi

# SIGINT, SIGTERM (to it or to its process group) or SIGHUP stops both servers; a start after a
# crash stops or reuses what the killed one left (study/store/server.py).
server: $(STAMP) postgres
	$(BIN)/python -m study.store.server --port $(PORT) --store $(SERVER_STORE)

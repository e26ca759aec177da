# rdn: `make test` and `make run` are the two entry points; both install first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Keep every tool's state inside the project and keep them quiet and offline.
export PATH := $(BIN):$(PATH)
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/site-cache
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: help install test run serve chat-server validate ui clean

help:
	@echo "make test      install (first time) and run the test suite"
	@echo "make run       install (first time) and run the pipeline on params.yaml: the Prefect flow"
	@echo "               rdn-full-pipeline over the DVC stages (RUN_ARGS='--stages data tokenizer')"
	@echo "make serve     local Prefect server + worker + MLflow UI on loopback; Ctrl-C stops all"
	@echo "make chat-server  the trained chat model: OpenAI-compatible API + chat page on"
	@echo "               http://127.0.0.1:8000/ (CHAT_ARGS='--stage sft --port 9000')"
	@echo "make validate  check params.yaml"
	@echo "make ui        MLflow UI over the project's runs on http://127.0.0.1:5000"
	@echo "make clean     remove artifacts, metrics and local MLflow data (keeps .venv)"

# Reinstall when the dependency declarations change. torch is pinned through
# constraints.txt so a CPU machine never pulls CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The Prefect flow runs directly on a temporary local Prefect API (no server to start,
# no network); each stage is `dvc repro -s <stage>`. RUN_ARGS: see `python -m flows.pipeline -h`.
run: install
	$(BIN)/rdn validate params.yaml
	$(BIN)/python -m flows.pipeline $(RUN_ARGS)

serve: install
	$(BIN)/rdn serve $(SERVE_ARGS)

chat-server: install
	$(BIN)/rdn serve-chat $(CHAT_ARGS)

validate: install
	$(BIN)/rdn validate params.yaml

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf artifacts metrics/*.json mlflow reports .prefect

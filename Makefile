# rnnserve: one entry point for people and CI. `make run` serves, `make test` proves it.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
STORE ?= model_store

.PHONY: setup java run test lint format protos train bench clean

setup: $(STAMP) java

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, by its exact pin: pip takes the local CPU build for it (never a CUDA download)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# TorchServe's frontend is Java: install a JRE when the machine has none.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "installing openjdk-17-jre-headless"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }

run: setup
	$(BIN)/rnnserve up --store $(STORE)

test: setup lint
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: setup
	$(BIN)/python -m serving.protogen

train: setup
	$(BIN)/rnnserve train --all --store $(STORE)

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

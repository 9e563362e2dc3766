# fmnist-service: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch is installed first and pinned here: on the reference machine this release is on disk,
# and pinning it stops pip from choosing a newer multi-GB download. pyproject.toml keeps a range.
TORCH_SPEC ?= torch==2.14.1
# TORCH_VARIANT=cpu takes torch from PyTorch's CPU-only wheel index instead of PyPI, whose Linux
# build brings the CUDA libraries along; the model runs on CPU either way (README, "Install").
TORCH_VARIANT ?=
TORCH_CPU_INDEX_URL := https://download.pytorch.org/whl/cpu
ifeq ($(TORCH_VARIANT),cpu)
TORCH_PIP_ARGS := --index-url $(TORCH_CPU_INDEX_URL)
else ifneq ($(TORCH_VARIANT),)
$(error TORCH_VARIANT=$(TORCH_VARIANT) is not a torch variant: leave it empty (PyPI's build) or set TORCH_VARIANT=cpu)
endif
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test lint typecheck train evaluate bench clean proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e . -e clients/python
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml clients/python/pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]" -e clients/python
	touch $@

## run: start the whole service (gateway + worker + embedded broker) on http://$(HOST):$(PORT)
run: $(VENV)/.installed
	$(BIN)/fmnist serve --host $(HOST) --port $(PORT)

## test: install with dev extras and run the whole test suite
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

## train: retrain the shipped checkpoint (the exact command is in models/fmnist.md)
train: $(VENV)/.installed
	$(BIN)/fmnist train --precision bf16 --threads 1 --batch-size 256 --lr 0.2 --warmup 0.25 --schedule one-cycle --label-smoothing 0.1 --grad-clip 0 --notes models/fmnist-experiments.md --out models/fmnist.safetensors

evaluate: $(VENV)/.installed
	$(BIN)/fmnist evaluate models/fmnist.safetensors

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

## proto: regenerate the Open Inference Protocol's gRPC code (app/gateway/v2/) from its .proto (KServe's)
PROTO_COMMAND := python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. app/gateway/v2/grpc_predict_v2.proto
proto: $(VENV)/.installed-dev
	$(BIN)/$(PROTO_COMMAND)

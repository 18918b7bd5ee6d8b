#!/usr/bin/env bash
# The CUDA path in one go (issue 13): build llama-cpp-python with CUDA, make the models, check that
# the server starts and gives the same numbers as llama.cpp in-process on the same device, and
# measure it (bench/gpu_check.py says what). Sized for one 10-minute call on a GPU machine that
# cannot download anything, so what it lacks is prepared here first:
#
#   bench/gpu_check.sh prepare [DIR]  # on a machine with PyPI: fills .gpu/ (git-ignored, 17 MB;
#                                     # 45 MB with a prebuilt CUDA llama.cpp): wheels the GPU
#                                     # machine lacks, llama-cpp-python's source trimmed, a
#                                     # tokenizer-only GGUF, make_random_gguf.py, the HellaSwag
#                                     # items, and llama.cpp built with CUDA if the CUDA image
#                                     # (make image-test-cuda) is here, or from DIR, the files an
#                                     # earlier run saved; without either it is built there
#   bench/gpu_check.sh run            # on the GPU machine, from the repo root (device tool:
#                                     # carry .gpu); results and log to $OUT or bench_out/gpu
#   bench/gpu_check.sh cpu            # any machine: the same checks on this checkout's CPU build
#                                     # (.venv) and the default model, small sizes
#                                     # (tests/test_gpu_check.py runs it)
#
# Environment: BUDGET_S (seconds the whole run may take, default 560), SHAPES (random-weight
# models, default 135m,1b,8b; cpu: none, the default model, SmolLM2-135M Q4_1, instead), ITEMS (HellaSwag items, default 100; cpu: 3), CUDA_ARCH (default 90),
# CUDA_IMAGE (prepare: the image to take llama.cpp's CUDA build from), GPU_DIR (instead of .gpu),
# PY_VERSION (prepare: the GPU machine's Python, default 3.12), PYTHON (run: default python3),
# REQUIRE_GPU=0 (run: accept a CUDA build that finds no GPU, to rehearse the run without one).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU_DIR:-.gpu}
LLAMA_CPP_PYTHON=0.3.36
CUDA_IMAGE=${CUDA_IMAGE:-localhost/logprobs-server:cuda-test}
say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

# What the GPU machine's Python 3.12 lacks of the server's dependencies (it has numpy, httpx,
# requests, jinja2, anyio, h11, click, prometheus-client): the versions this checkout is tested with.
WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
typing-inspection==0.4.5 typing-extensions==4.16.0 annotated-types==0.8.0 python-dotenv==1.2.4 uvicorn==0.54.0
diskcache==5.6.3 gguf==0.19.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2"

default_model() {  # the default model's file (SmolLM2-135M Q4_1), fetched once into the cache
    .venv/bin/python -c "from server.config import Settings; from server.models.default_model import \
ensure_default_model as e; print(e(Settings().cache_path()))"
}

prepare() {
    local saved=${1:-}
    mkdir -p $GPU/wheels $GPU/src $GPU/data $GPU/tools $GPU/cache
    say "wheels for Python ${PY_VERSION:-3.12} on x86-64"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d $GPU/wheels $WHEELS
    if [ ! -f $GPU/src/llama-cpp-python.tar.gz ]; then
        say "llama-cpp-python $LLAMA_CPP_PYTHON source, without llama.cpp's model files, docs, tests and other backends"
        local tmp; tmp=$(mktemp -d)
        .venv/bin/python -m pip download -q --no-deps --no-binary=:all: -d "$tmp" llama-cpp-python==$LLAMA_CPP_PYTHON
        tar -xzf "$tmp"/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz -C "$tmp"
        local src=$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON v=$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
        rm -rf "$src"/{.git,docs,examples,tests} "$v"/{models,docs,media,benches,tests,examples,scripts,gguf-py,conversion}
        find "$v"/tools -mindepth 1 -maxdepth 1 ! -name mtmd -exec rm -rf {} +
        find "$v"/ggml/src -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' ! -name ggml-cpu ! -name ggml-cuda \
            -exec rm -rf {} +
        tar -czf $GPU/src/llama-cpp-python.tar.gz -C "$tmp" llama_cpp_python-$LLAMA_CPP_PYTHON
        rm -rf "$tmp"
    fi
    say "a tokenizer-only GGUF (SmolLM2's tokenizer, one tiny layer): the models are made from it there"
    local smol; smol=$(default_model)
    cp bench/make_random_gguf.py $GPU/tools/
    cp data/hellaswag_dev.jsonl $GPU/data/
    [ -f $GPU/tokenizer.gguf ] || .venv/bin/python $GPU/tools/make_random_gguf.py --tokenizer-from "$smol" \
        $GPU/tokenizer.gguf --n-embd 32 --n-layer 1 --n-head 1 --n-head-kv 1 --n-ff 32 --n-ctx 2048
    if [ -n "$saved" ]; then
        rm -f $GPU/cache/*
        cp "$saved"/llama_cpp_python-*.whl.part* $GPU/cache/ && say "carrying the CUDA build saved in $saved"
    elif [ ! -f $GPU/cache/llama-cpp-cuda.tar.xz ] && command -v buildah >/dev/null \
        && buildah inspect --type image "$CUDA_IMAGE" >/dev/null 2>&1; then
        # The CUDA image's llama.cpp (make image-test-cuda: CUDA 13.5, kernels for 9.0, no flash
        # attention kernels, no link to the driver) saves the ~4-minute build there.
        say "carrying the llama.cpp CUDA build of $CUDA_IMAGE"
        local ctr mnt tmp; ctr=$(buildah from -q "$CUDA_IMAGE"); mnt=$(buildah mount "$ctr"); tmp=$(mktemp -d)
        cp -a "$mnt"/opt/venv/lib/python3*/site-packages/llama_cpp{,_python-$LLAMA_CPP_PYTHON.dist-info} "$tmp"/
        (cd "$tmp"/llama_cpp/lib && for f in *.so.0.*; do ln -sf "$f" "${f%%.so.*}.so.0"; ln -sf "${f%%.so.*}.so.0" "${f%%.so.*}.so"; done)
        tar -cJf $GPU/cache/llama-cpp-cuda.tar.xz -C "$tmp" .
        buildah umount "$ctr" >/dev/null; buildah rm "$ctr" >/dev/null; rm -rf "$tmp"
    fi
    say "ready: $(du -sh $GPU | cut -f1) in $GPU; on the GPU machine (device tool, carry [\".gpu\"]):"
    echo "  bench/gpu_check.sh run"
}

cuda_libraries() {
    # Folders holding the CUDA runtime and cuBLAS 13 that llama.cpp's CUDA library links to: the
    # toolkit's, or the pip packages PyTorch brings (nvidia/cu13/lib), for a build made elsewhere.
    local d
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        $($1 -c "import nvidia, os; [print(os.path.join(p, 'cu13', 'lib')) for p in nvidia.__path__]" 2>/dev/null); do
        [ -e "$d/libcublas.so.13" ] && printf '%s:' "$d"
    done
}

run_on_gpu() {
    local started; started=$(date +%s)
    local out=${OUT:-bench_out/gpu}
    mkdir -p "$out"
    exec > >(tee "$out/gpu_check.log") 2>&1
    [ -d $GPU/wheels ] || { say "no $GPU/: run 'bench/gpu_check.sh prepare' on a machine with PyPI first"; exit 2; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || say "nvidia-smi: no GPU?"
    local py=${PYTHON:-python3} site=/tmp/gpu-site
    $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target $site $GPU/wheels/*.whl
    export PYTHONPATH=$site LD_LIBRARY_PATH="$(cuda_libraries "$py")${LD_LIBRARY_PATH:-}"
    # REQUIRE_GPU=0: a CUDA build that finds no GPU will do (a rehearsal of this path on a machine
    # without one; llama.cpp then runs on the CPU).
    cuda_ok() { $py -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() or
'${REQUIRE_GPU:-1}' == '0' else 1)" 2>/dev/null; }
    if cuda_ok; then
        say "CUDA build: the one this machine already has ($site)"
    elif [ -f $GPU/cache/llama-cpp-cuda.tar.xz ]; then
        say "CUDA build: the prebuilt one carried in $GPU/cache (from the CUDA image)"
        tar -xJf $GPU/cache/llama-cpp-cuda.tar.xz -C $site
        cuda_ok || { say "it does not load here (libraries: ${LD_LIBRARY_PATH}); building instead"; rm -rf $site/llama_cpp; }
    elif ls $GPU/cache/llama_cpp_python-*.whl.part* >/dev/null 2>&1; then
        local name; name=$(basename "$(ls $GPU/cache/llama_cpp_python-*.whl.part* | head -1)" | sed 's/\.part.*//')
        cat $GPU/cache/"$name".part* > /tmp/"$name"
        say "CUDA build: the wheel an earlier run saved ($name)"
        $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target $site /tmp/"$name"
    fi
    if ! cuda_ok; then
        command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
        say "building llama-cpp-python $LLAMA_CPP_PYTHON with CUDA (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), arch ${CUDA_ARCH:-90}; ~4 minutes on 16 cores)"
        rm -rf /tmp/gpu-src /tmp/gpu-wheelhouse && mkdir -p /tmp/gpu-src /tmp/gpu-wheelhouse
        tar -xzf $GPU/src/llama-cpp-python.tar.gz -C /tmp/gpu-src
        # Flash-attention kernels are left out (the server turns flash attention off: its float16
        # accumulation moves scores), which halves the build; llava/mtmd is not used.
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
            $py -m pip wheel -q --no-build-isolation --no-deps -w /tmp/gpu-wheelhouse /tmp/gpu-src/llama_cpp_python-*
        local wheel; wheel=$(ls /tmp/gpu-wheelhouse/llama_cpp_python-*.whl | head -1)
        say "built in $(( $(date +%s) - started )) s: $(du -h "$wheel" | cut -f1)"
        $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target $site "$wheel"
        if [ -n "${OUT:-}" ]; then  # saved for the next call (files of at most 16 MiB come back)
            split -b 15M -d "$wheel" "$OUT/$(basename "$wheel").part"
            say "saved as $(ls "$OUT"/*.part* | wc -l) parts in \$OUT: 'bench/gpu_check.sh prepare FILES_AT' carries them"
        fi
        cuda_ok || { say "FAIL: the CUDA build does not offload to the GPU"; exit 1; }
    fi
    local left=$(( ${BUDGET_S:-560} - ($(date +%s) - started) ))
    say "checks and measurements, ${left} s of the budget left"
    PYTHONUNBUFFERED=1 $py -m bench.gpu_check --shapes "${SHAPES:-135m,1b,8b}" --items "${ITEMS:-100}" \
        --shared-items "${SHARED_ITEMS:-25}" \
        --budget-s "$left" --models /tmp/gpu-models --tokenizer-from $GPU/tokenizer.gguf \
        --tool $GPU/tools/make_random_gguf.py --data $GPU/data --out "$out" --logs /tmp/gpu-logs
}

run_on_cpu() {
    local smol; smol=$(default_model)
    PYTHONUNBUFFERED=1 .venv/bin/python -m bench.gpu_check --model "$smol" --shapes "${SHAPES-}" --items "${ITEMS:-3}" \
        --shared-items "${ITEMS:-3}" --rounds 1 --budget-s "${BUDGET_S:-3600}" \
        --models "$(dirname "$smol")" --tokenizer-from "$smol" --out "${OUT:-bench_out/gpu-cpu}"
}

case "${1:-run}" in
    prepare) prepare "${2:-}" ;;
    run) run_on_gpu ;;
    cpu) run_on_cpu ;;
    *) echo "usage: bench/gpu_check.sh prepare [DIR] | run | cpu" >&2; exit 2 ;;
esac

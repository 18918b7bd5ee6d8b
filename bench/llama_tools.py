"""llama.cpp's own tools (llama-perplexity, llama-server), built once from the llama.cpp source that
llama-cpp-python vendors, with this machine's CMAKE_ARGS (the Makefile's, as the server's llama.cpp
was built), and cached: the benchmarks compare the server with them on the same kernels."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def llama_tool(cache: Path, target: str) -> Path:
    """The binary `target` (llama-perplexity, llama-server) of the vendored llama.cpp: downloaded
    as llama-cpp-python's sdist from PyPI and built once per CMAKE_ARGS (about 10 minutes on 2
    cores), then taken from `cache`."""
    cmake_args = os.environ.get("CMAKE_ARGS", "").split()
    key = hashlib.sha256(" ".join(cmake_args).encode()).hexdigest()[:12]
    root = cache / "llama-tools" / f"{LLAMA_CPP_PYTHON}-{key}"
    binary = root / "build" / "bin" / target
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s source from PyPI (for its vendored llama.cpp)")
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)], check=True)
    source = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not source.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    log(f"building {target} (about 10 minutes on 2 cores, once) with {' '.join(cmake_args) or 'no CMAKE_ARGS'}")
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
    options += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
    build_log = root / f"build-{target}.log"  # the compiler's warnings are many; kept, not shown
    with build_log.open("w") as out:
        for command in (
            ["cmake", "-S", str(source), "-B", str(root / "build"), *options, *cmake_args],
            ["cmake", "--build", str(root / "build"), "--target", target, "-j", str(os.cpu_count() or 2)],
        ):
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building {target} failed: see {build_log}")
    return binary

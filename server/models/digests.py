"""sha256 of model files, kept in a JSON file in the cache folder so that a restart does not read a
multi-gigabyte file again: {path: {size, mtime_ns, sha256}}, valid while size and time are unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DIGEST_CACHE = "digests.json"  # in the cache folder


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 of files, kept in a JSON file: {path: {size, mtime_ns, sha256}}; an entry counts only
    while the file's size and modification time are unchanged."""

    def __init__(self, file: Path | None):
        self.file = file
        # path -> {size, mtime_ns, sha256}, as read from the file: arbitrary JSON, checked where read
        self.entries: dict[str, Any] = {}
        self.changed = False
        if file is not None:
            try:
                loaded = json.loads(file.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}  # valid JSON, but not this file's
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            cached: str = entry["sha256"]  # written by this class, as the hex digest
            return cached
        digest = sha256_of(path)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.file is None or not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            partial.replace(self.file)  # atomic: concurrent servers never read half a file
        except OSError as exc:  # a read-only cache folder costs a re-hash next time, nothing else
            log.debug("could not keep model digests in %s: %s", self.file, exc)


def _model_files(folder: Path) -> list[Path]:
    """An MLX folder's files that can change the numbers: everything but hidden files (a download
    tool's .cache) and documentation."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() != ".md"
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def model_sha256(path: Path, cache: DigestCache) -> str:
    """sha256 of a model file; for a folder, of its files' names and sha256s."""
    if not path.is_dir():
        return cache.sha256(path)
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{cache.sha256(p)}\n" for p in _model_files(path))
    return hashlib.sha256(listing.encode()).hexdigest()

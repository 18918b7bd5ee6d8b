"""Installed distributions' versions: parts of the system fingerprint (the runtime a backend runs
on, numpy, this server), read where each part is named."""

from __future__ import annotations

from importlib import metadata


def package_version(distribution: str) -> str:
    """An installed distribution's version ("unknown" when it is not installed)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"

"""Models by Hugging Face Hub name: `ORG/NAME` (an MLX repo), `ORG/NAME:QUANT` or `ORG/NAME/FILE.gguf`
(a file of a GGUF repo), each with an optional `@REVISION` (branch, tag or commit).

Through huggingface_hub: its cache (HF_HOME, HF_HUB_CACHE), HF_TOKEN for gated repos, its progress
bars. With HF_HUB_OFFLINE=1 a model in the cache is served without any network call: the revision
is read from the cache's refs, and the quantization is chosen from the cached snapshot's files, not
from the Hub's file list. Every problem is a ConfigError that says how to fix it, raised before any
model loads.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from server.backends import KINDS
from server.backends.base import BackendKind
from server.config import ConfigError
from server.models.digests import DigestCache

log = logging.getLogger(__name__)

# ORG/NAME, then :QUANT or /FILE.gguf, then @REVISION. (Repo ids: letters, digits, "-", "_", ".".)
_REF = re.compile(
    r"(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<quant>[\w.-]+)|/(?P<file>[^@]+\.gguf))?(?:@(?P<revision>[\w./-]+))?", re.ASCII
)
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRef:
    repo: str
    quant: str | None = None
    file: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubRef | None:
        """The reference `text` names, or None when it is not of a Hub reference's form."""
        m = _REF.fullmatch(text)
        if not m or text.startswith((".", "/", "~")):
            return None
        return cls(m["repo"], m["quant"], m["file"], m["revision"])


@dataclass
class HubModel:
    """A model fetched (or found in the cache): where it lies and what it is."""

    path: Path  # the .gguf file to load (a split model's first part), or the MLX snapshot folder
    kind: str  # the BackendKind's name
    repo: str
    commit: str
    weights: dict[str, str] = field(default_factory=dict)  # file in the repo -> its sha256

    def fingerprint_parts(self) -> dict[str, str]:
        return {
            "hub_repo": self.repo,
            "hub_commit": self.commit,
            "hub_weights_sha256": ",".join(f"{name}={sha}" for name, sha in sorted(self.weights.items())),
        }


# -- choosing the kind ---------------------------------------------------------------------------


def _kind(ref: HubRef, files: list[str], backend: str | None) -> BackendKind:
    """The kind of model to serve from a repo's files: --backend's, else one the repo holds (a
    :QUANT or /FILE names a file of a kind whose repos hold several; a repo that is one model,
    MLX's, is chosen before one of such files)."""
    held = [kind for kind in KINDS.values() if kind.in_repo(files)]
    named = ":" + ref.quant if ref.quant else "/" + ref.file if ref.file else ""
    if backend is None:
        fitting = [k for k in held if k.names_files] if named else sorted(held, key=lambda k: k.names_files)
        if fitting:
            return fitting[0]
        wanted = next(k for k in KINDS.values() if k.names_files) if named or not held else held[0]
    else:
        wanted = KINDS[backend]
        if named and not wanted.names_files:
            raise ConfigError(
                f"--backend {backend} with {ref.repo}{named}: a quantization or file name is for "
                f"{', '.join(k.name for k in KINDS.values() if k.names_files)} repos; name the repo alone."
            )
    if wanted not in held:
        others = ", ".join(k.files for k in held if k is not wanted)
        raise ConfigError(
            f"{ref.repo} {wanted.absent}"
            + (f": it holds {others}" + (f"; drop --backend {wanted.name}." if backend else ".") if others else ".")
        )
    return wanted


# -- the cache, offline -------------------------------------------------------------------------


def _cache_folder(repo: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))


def _cached_commit(ref: HubRef) -> str:
    folder = _cache_folder(ref.repo)
    # The narrowest download that serves this reference: one file, one quantization, or the repo.
    narrow = f" {ref.file}" if ref.file else f' --include "*{ref.quant}*"' if ref.quant else ""
    fill = f"fill it while online with: hf download {ref.repo}{narrow}" + (
        f" --revision {ref.revision}" if ref.revision else ""
    )
    if not folder.is_dir():
        raise ConfigError(
            f"{ref.repo} is not in the Hugging Face cache ({folder.parent}) and HF_HUB_OFFLINE=1 "
            f"forbids fetching it; {fill} (or unset HF_HUB_OFFLINE)."
        )
    revision = ref.revision or "main"
    if _COMMIT.fullmatch(revision) and (folder / "snapshots" / revision).is_dir():
        return revision
    refs = folder / "refs" / revision
    if not refs.is_file():
        raise ConfigError(
            f"{ref.repo}: the revision '{revision}' is not in the cache ({folder}) and HF_HUB_OFFLINE=1 "
            f"forbids asking the Hub; {fill}."
        )
    return refs.read_text().strip()


def _cached_files(repo: str, commit: str) -> list[str]:
    snapshot = _cache_folder(repo) / "snapshots" / commit
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _blob_sha256(path: Path) -> str | None:
    """The sha256 the Hub gave an LFS file: its cache blob is named by it (the file's etag)."""
    name = Path(path).resolve().name
    return name if re.fullmatch(r"[0-9a-f]{64}", name) else None


# -- resolving ----------------------------------------------------------------------------------


def fetch(ref: HubRef, backend: str | None, digests: DigestCache) -> HubModel:
    """The model `ref` names, from the cache when it is there (and only from there when offline),
    else downloaded with progress bars. Raises ConfigError for anything the user must fix.
    `digests` keeps the weight files' sha256 between starts."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        commit = _cached_commit(ref)
        files = _cached_files(ref.repo, commit)
        hub_sha256: dict[str, str] = {}
    else:
        commit, files, hub_sha256 = _list_online(ref)
    kind = _kind(ref, files, backend)
    wanted = kind.repo_files(ref.repo, ref.quant, ref.file, files)
    paths = _download(ref.repo, commit, wanted, offline=constants.HF_HUB_OFFLINE)
    weights = {}
    for name, path in paths.items():
        if name.endswith(kind.weight_suffix):
            weights[name] = _checked_sha256(ref.repo, name, path, hub_sha256.get(name) or _blob_sha256(path), digests)
    digests.save()
    model = HubModel(
        path=kind.model_path(paths[wanted[0]]), kind=kind.name, repo=ref.repo, commit=commit, weights=weights
    )
    size = sum(p.stat().st_size for p in paths.values())
    log.info(
        "%s@%s: %s (%d file(s), %.1f MB) in %s",
        ref.repo,
        commit[:12],
        f"{kind.name}: {wanted[0]}",
        len(paths),
        size / 1e6,
        model.path,
    )
    return model


def _list_online(ref: HubRef) -> tuple[str, list[str], dict[str, str]]:
    """(commit, files, sha256 of LFS files) from the Hub's model info."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True)
    except GatedRepoError:
        raise ConfigError(
            f"{ref.repo} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that "
            "account (or run `hf auth login`)."
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"{ref.repo} has no revision '{ref.revision}' (a branch, tag or commit).") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"No model repo {ref.repo} on the Hugging Face Hub (or it is private: set HF_TOKEN). "
            "For a local file or folder, check the path."
        ) from None
    except Exception as exc:  # network: say so, and how to serve from the cache instead
        raise ConfigError(
            f"Could not reach the Hugging Face Hub for {ref.repo} ({type(exc).__name__}: {exc}); "
            "with the model in the cache, set HF_HUB_OFFLINE=1."
        ) from None
    siblings = info.siblings or []
    sha256 = {s.rfilename: s.lfs.sha256 for s in siblings if s.lfs is not None and s.lfs.sha256}
    assert info.sha is not None  # the Hub sends a model's commit (huggingface_hub types every field optional)
    return info.sha, [s.rfilename for s in siblings], sha256


def _download(repo: str, commit: str, files: list[str], offline: bool) -> dict[str, Path]:
    """Each file's path in the cache, fetched first when online (huggingface_hub's progress bars)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    paths = {}
    for name in files:
        if offline:
            found = try_to_load_from_cache(repo, name, revision=commit)
            if not isinstance(found, str):
                raise ConfigError(
                    f"{repo}@{commit[:12]}: {name} is not in the cache ({_cache_folder(repo)}) and "
                    f"HF_HUB_OFFLINE=1 forbids fetching it; fill it while online with: "
                    f"hf download {repo} {name} --revision {commit}"
                )
            paths[name] = Path(found)
        else:
            paths[name] = Path(hf_hub_download(repo, name, revision=commit))
    return paths


def _checked_sha256(repo: str, name: str, path: Path, expected: str | None, digests: DigestCache) -> str:
    """The file's sha256, checked against the Hub's (an LFS file's etag) when there is one. Hashed
    once: the digest cache keeps it by path, size and time."""
    actual = digests.sha256(path)
    if expected is not None and expected != actual:
        log.warning(
            "%s: %s has sha256 %s but the Hub names it %s: the cached file is not the Hub's; delete it "
            "from the cache and fetch it again",
            repo,
            name,
            actual,
            expected,
        )
    return actual

"""MLX models through mlx-lm: a Hugging Face-layout folder (config.json, safetensors, tokenizer).

mlx-lm's model is called directly on token arrays with its own KV cache, which gives per-token
logits. On a GPU (Metal), log-softmax and top-k run in MLX (mlx_scoring.py), so
only the numbers a response needs leave the device. On the CPU device the logits already are in
host memory, and numpy reads them without a copy: its vectorized exp is ~9x faster than MLX's CPU
exp (0.11 vs 0.95 ms per row at vocabulary 49152, measured), so scoring there is numpy's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from server.backends.base import MAX_DEFAULT_CTX, Backend, BackendKind, ModelInfo, Step, default_context
from server.backends.mlx_scoring import MxArray, score_rows_mlx
from server.backends.versions import package_version
from server.config import ConfigError, Settings, default_threads
from server.numerics.scoring import ScoredRows, score_rows
from server.text.tokens import TokenTable

log = logging.getLogger(__name__)

# Debian/Ubuntu's OpenBLAS; mlx[cpu] on Linux bundles a reference BLAS ~40x slower on matmuls.
OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
]


def find_openblas() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)


def openblas_preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def _warn_without_openblas() -> None:
    if sys.platform.startswith("linux") and not openblas_preloaded():
        log.warning(
            "MLX on Linux without OpenBLAS preloaded: matmuls run on a slow reference BLAS. "
            "Install libopenblas0-pthread and start with `logprobs-server` (it preloads it) "
            "or set LD_PRELOAD=%s",
            find_openblas() or "/path/to/libopenblas.so.0",
        )


MLX_LM_MISSING = "The MLX backend needs mlx-lm: pip install -e '.[mlx]' (from the checkout)"


class MLXKind(BackendKind):
    name = "mlx"
    files = "an mlx-lm model folder"
    absent = "is not an MLX model (no config.json with .safetensors weights)"
    weight_suffix = ".safetensors"

    def refuses(self, path: Path) -> str | None:
        if not path.is_dir():
            return "not an mlx-lm model folder (it is a file)"
        return None if (path / "config.json").exists() else "not an mlx-lm model folder (it has no config.json)"

    def in_repo(self, files: list[str]) -> bool:
        return "config.json" in files and any(f.endswith(".safetensors") and "/" not in f for f in files)

    def repo_files(self, repo: str, quant: str | None, file: str | None, files: list[str]) -> list[str]:
        """mlx-lm's own list of what a model needs (config, weights, tokenizer), config.json first."""
        try:
            from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
        except ImportError:
            raise ConfigError(MLX_LM_MISSING) from None
        wanted = [f for f in files if any(fnmatch(f, p) for p in DEFAULT_ALLOW_PATTERNS)]
        return ["config.json", *(f for f in wanted if f != "config.json")]

    def model_path(self, first: Path) -> Path:
        return first.parent  # the snapshot folder that holds config.json

    def load(self, path: Path, settings: Settings) -> Backend:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            raise ConfigError(MLX_LM_MISSING) from None
        return MLXBackend(
            str(path),
            n_ctx=settings.n_ctx,
            n_batch=settings.n_batch,
            n_threads=settings.n_threads or default_threads(),
            max_sequences=settings.max_sequences,
        )

    def prepare_process(self, argv: list[str]) -> None:
        """mlx[cpu] on Linux ships a reference BLAS ~40x slower than OpenBLAS; a library is only
        replaced at process start, so restart this process with OpenBLAS preloaded when it exists."""
        if not sys.platform.startswith("linux") or openblas_preloaded() or not (blas := find_openblas()):
            return
        print(
            f"logprobs-server: MLX backend: restarting with LD_PRELOAD={blas} (OpenBLAS)", file=sys.stderr, flush=True
        )
        preload = " ".join(p for p in (os.environ.get("LD_PRELOAD"), blas) if p)
        os.execve(sys.executable, [sys.executable, "-m", "server", *argv], {**os.environ, "LD_PRELOAD": preload})


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE writes each byte as one printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_bytes_table(hf_tokenizer: Any, n_vocab: int) -> list[bytes]:
    """The bytes each token id stands for, by the tokenizer's decoder type (byte-level BPE or
    SentencePiece); special tokens are their text, as in the GGUF backend."""
    decoder = json.loads(hf_tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    special = {i: t.content for i, t in hf_tokenizer.added_tokens_decoder.items()}
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(min(n_vocab, len(hf_tokenizer)))))
    byte_decoder = _byte_level_decoder()
    table: list[bytes] = []
    for token_id in range(n_vocab):
        piece = pieces[token_id] if token_id < len(pieces) else None
        if token_id in special:
            table.append(special[token_id].encode("utf-8"))
        elif piece is None:  # embedding rows past the tokenizer's vocabulary
            table.append(b"")
        elif "ByteLevel" in kinds:
            table.append(bytes(byte_decoder.get(c, 0x3F) for c in piece))
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def _model_info(path: str, config: dict[str, Any], hf: Any, n_vocab: int, n_ctx: int, n_ctx_train: int) -> ModelInfo:
    """What the server tells clients about an mlx-lm model, from its config and HF tokenizer."""
    text_config = config.get("text_config", config)
    with_special = hf.encode("a", add_special_tokens=True)
    without = hf.encode("a", add_special_tokens=False)
    bos = hf.bos_token_id
    quant = config.get("quantization", {})
    return ModelInfo(
        path=str(path),
        n_ctx=n_ctx,
        n_ctx_train=n_ctx_train,
        n_vocab=n_vocab,
        bos_id=bos,
        eos_id=hf.eos_token_id,
        pad_id=hf.pad_token_id,
        add_bos=bos is not None and with_special[:1] == [bos] and without[:1] != [bos],
        chat_template=hf.chat_template if isinstance(hf.chat_template, str) else None,
        description=f"{text_config.get('model_type', '?')} (mlx), "
        + (f"{quant.get('bits')}-bit quantized" if quant else str(config.get("torch_dtype", "float"))),
    )


def _fingerprint_parts(mx: ModuleType, on_cpu: bool) -> dict[str, str]:
    """MLX's versions, its device, and on Linux the BLAS behind its CPU matmuls."""
    parts = {"mlx": package_version("mlx"), "mlx_lm": package_version("mlx-lm"), "device": str(mx.default_device())}
    if not on_cpu:
        try:
            parts["device_architecture"] = str(mx.device_info().get("architecture", "unknown"))
        except Exception:  # older MLX: mx.metal.device_info
            parts["device_architecture"] = "unknown"
    elif sys.platform.startswith("linux"):
        parts["blas"] = "openblas" if openblas_preloaded() else "bundled"
    return parts


class MLXBackend(Backend):
    kind = "mlx"

    def __init__(self, path: str, n_ctx: int = 0, n_batch: int = 512, n_threads: int = 1, max_sequences: int = 1):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        _warn_without_openblas()
        self._mx = mx
        self.on_cpu = mx.default_device() == mx.cpu
        self.scoring_threads = n_threads
        self.model, wrapper = load(path)[:2]  # (model, tokenizer): no config asked for
        self._hf = wrapper._tokenizer
        self._make_cache = make_prompt_cache
        self.n_batch = n_batch

        config = json.loads((Path(path) / "config.json").read_text())
        text_config = config.get("text_config", config)
        # The logits' width (embedding rows), which can exceed the tokenizer's vocabulary.
        n_vocab = int(self.model(mx.array([[0]]))[0].shape[-1])
        self.max_sequences = max_sequences
        self._caches: dict[int, list[Any]] = {}  # per sequence: mlx-lm's per-layer KV caches
        # Sequences decoding together, and their caches merged into mlx-lm's left-padded batch caches
        # (kept while the same sequences go on, so that each step does not copy every KV).
        self._batch: tuple[tuple[int, ...], list[Any]] | None = None
        # Plain per-layer KV caches can be snapshotted for the prefix cache (rotating or state-space
        # caches of other architectures hold more than keys and values: no reuse for those).
        self.supports_snapshots = all(type(c) is KVCache for c in make_prompt_cache(self.model))
        # Prompts admitted together (--max-sequences > 1) share passes where each sequence's cache
        # can be cut out of the batch's: plain KV caches, as for snapshots.
        self.shares_prompt_passes = self.supports_snapshots and max_sequences > 1
        n_ctx_train = int(text_config.get("max_position_embeddings") or self._hf.model_max_length or MAX_DEFAULT_CTX)
        eog = set(wrapper.eos_token_ids) | ({self._hf.eos_token_id} if self._hf.eos_token_id is not None else set())
        self.tokens = TokenTable(_token_bytes_table(self._hf, n_vocab), eog)

        self.info = _model_info(path, config, self._hf, n_vocab, default_context(n_ctx, n_ctx_train), n_ctx_train)

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self._hf.encode(text, add_special_tokens=add_special_tokens)
        return ids

    # -- forward passes -----------------------------------------------------------------------
    def prefill(self, seq: int, tokens: Sequence[int], start: int, logits_from: int) -> MxArray | None:
        mx = self._mx
        self._leave_batch(seq)
        if start == 0:
            self._caches[seq] = self._make_cache(self.model)
        cache = self._caches[seq]
        if start != cache[0].offset:
            raise RuntimeError(f"prefill from position {start}, but the cache holds {cache[0].offset} tokens")
        logits = self.model(mx.array(tokens)[None], cache=cache)[0]
        if logits_from < len(tokens):
            return logits[logits_from:]
        mx.eval([c.state for c in cache])  # run the pass now: the next chunk needs this KV
        return None

    def prefill_together(self, prompts: Sequence[tuple[int, Sequence[int], int]]) -> list[MxArray]:
        """One (k, longest) batch, each prompt padded at its end with its last token: causal
        attention keeps the pad out of its rows, and each sequence keeps only its own tokens' KV.
        The batched matrix products round differently from one prompt's (up to 4.4e-5 in a
        log-probability on the test fixture) and run faster (1.4x for 16 prompts there)."""
        mx = self._mx
        width = max(len(tokens) for _, tokens, _ in prompts)
        for seq, _, _ in prompts:
            self._leave_batch(seq)
        shared = self._make_cache(self.model)
        batch = mx.array([list(tokens) + [tokens[-1]] * (width - len(tokens)) for _, tokens, _ in prompts])
        logits = self.model(batch, cache=shared)
        blocks: list[MxArray] = []
        for i, (seq, tokens, logits_from) in enumerate(prompts):
            n = len(tokens)
            own = self._make_cache(self.model)  # plain KVCache layers (shares_prompt_passes)
            for layer, merged in zip(own, shared):
                layer.keys, layer.values = merged.keys[i : i + 1, :, :n, :], merged.values[i : i + 1, :, :n, :]
                layer.offset = n
            self._caches[seq] = own
            blocks.append(logits[i, logits_from:n])
        return blocks

    def decode(self, steps: Sequence[Step]) -> npt.NDArray[np.float32]:
        if len(steps) == 1:  # one sequence runs on its own cache, exactly as its prompt did
            (step,) = steps
            return np.array(self.prefill(step.seq, [step.token], step.position, 0), dtype=np.float32)
        return np.array(self._decode_together(steps), dtype=np.float32)

    def _decode_together(self, steps: Sequence[Step]) -> MxArray:
        """One token of each of several sequences in one forward pass (--max-sequences > 1), on
        their caches merged into mlx-lm's left-padded batch caches."""
        mx = self._mx
        seqs = tuple(s.seq for s in steps)
        if self._batch is None or self._batch[0] != seqs:
            self._unbatch()
            for s in steps:
                if s.position != self._caches[s.seq][0].offset:
                    raise RuntimeError(
                        f"sequence {s.seq}: decode at {s.position}, cache holds {self._caches[s.seq][0].offset}"
                    )
            per_layer = zip(*(self._caches.pop(q) for q in seqs))
            self._batch = (seqs, [layer[0].merge(list(layer)) for layer in per_layer])
        return self.model(mx.array([[s.token] for s in steps]), cache=self._batch[1])[:, -1, :]

    def _leave_batch(self, seq: int) -> None:
        """Before a sequence runs alone, is restored or released: split the batch it is in."""
        if self._batch is not None and seq in self._batch[0]:
            self._unbatch()

    def _unbatch(self) -> None:
        if self._batch is not None:
            seqs, merged = self._batch
            for i, seq in enumerate(seqs):
                self._caches[seq] = [c.extract(i) for c in merged]
            self._batch = None

    # -- prefix cache -------------------------------------------------------------------------
    def snapshot(self, seq: int) -> tuple[object, int]:
        mx = self._mx
        cache = self._caches[seq]
        n = cache[0].offset
        # Copies, evaluated now: the live cache is written in place as the sequence goes on.
        state = [(mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :])) for c in cache]
        mx.eval(state)
        return state, sum(k.nbytes + v.nbytes for k, v in state)

    def restore(self, seq: int, state: Any, n_tokens: int) -> None:
        cache = self._make_cache(self.model)  # plain KVCache layers (supports_snapshots)
        for layer, (keys, values) in zip(cache, state):
            layer.keys, layer.values, layer.offset = keys[..., :n_tokens, :], values[..., :n_tokens, :], n_tokens
        self._leave_batch(seq)
        self._caches[seq] = cache

    def release(self, seq: int) -> None:
        self._leave_batch(seq)
        self._caches.pop(seq, None)

    def score(self, logits: MxArray, targets: np.ndarray, k: int, ranks: bool = False) -> ScoredRows:
        if self.on_cpu:  # see the module's docstring
            logits = logits.astype(self._mx.float32)
            self._mx.eval(logits)
            return score_rows(np.array(logits, copy=False), targets, k, threads=self.scoring_threads, ranks=ranks)
        return score_rows_mlx(logits, targets, k, ranks=ranks)

    def fingerprint_parts(self) -> dict[str, str]:
        return _fingerprint_parts(self._mx, self.on_cpu)

    def close(self) -> None:
        self._caches.clear()
        self._batch = None


KIND = MLXKind()

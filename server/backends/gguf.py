"""GGUF models through llama.cpp, driven by llama-cpp-python's low-level (C) API.

The high-level `Llama` class is not used: it keeps an n_batch x n_vocab (or n_ctx x n_vocab)
logits buffer and samples in Python. Here a llama_batch asks llama.cpp for logits only at the
positions a response needs, and they are read straight out of llama.cpp's own buffer.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.backends.base import Backend, BackendKind, ModelInfo, ReuseRule, Step, default_context
from server.backends.gguf_files import choose_gguf, is_gguf_file
from server.config import Settings, default_threads
from server.text.tokens import TokenTable

log = logging.getLogger(__name__)


class GGUFKind(BackendKind):
    name = "gguf"
    files = "a GGUF file"
    absent = "holds no .gguf file"
    weight_suffix = ".gguf"
    names_files = True

    def refuses(self, path: Path) -> str | None:
        if path.is_dir():
            return "not a GGUF file (it is a folder)"
        return None if is_gguf_file(path) else "not a GGUF file (it does not start with the GGUF magic bytes)"

    def in_repo(self, files: list[str]) -> bool:
        return any(f.lower().endswith(".gguf") for f in files)

    def repo_files(self, repo: str, quant: str | None, file: str | None, files: list[str]) -> list[str]:
        return choose_gguf(repo, quant, file, files)

    def load(self, path: Path, settings: Settings) -> Backend:
        return GGUFBackend(
            str(path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads or default_threads(),
            n_batch=settings.n_batch,
            kv_cache_type=settings.kv_cache_type,
            max_sequences=settings.max_sequences,
        )


KIND = GGUFKind()


def _context_params(ll: Any, n_ctx: int, n_batch: int, n_threads: int, kv_cache_type: str, max_sequences: int) -> Any:
    """llama.cpp's context parameters, chosen so that scores are exact."""
    ctx_params = ll.llama_context_default_params()
    # Each sequence gets its own KV stream of n_ctx cells. (llama.cpp's unified KV cache, one
    # pool shared by all sequences, moved logits by up to 1.3 whenever another sequence held
    # cells in it, in this build; separate streams give the same numbers as one sequence alone.)
    ctx_params.n_ctx = n_ctx * max_sequences
    ctx_params.n_seq_max = max_sequences
    ctx_params.kv_unified = False
    ctx_params.n_batch = ctx_params.n_ubatch = n_batch
    ctx_params.n_threads = ctx_params.n_threads_batch = n_threads
    # llama.cpp's default (auto) turns flash attention on for CPUs, whose kernel accumulates in
    # float16: logits moved by up to 1.0 on SmolLM2 (logprobs by 0.1). Scores must be exact.
    ctx_params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    # llama.cpp stores K and V in float16 by default; float32 keeps scores exact (see Settings).
    ctx_params.type_k = ctx_params.type_v = ll.GGML_TYPE_F32 if kv_cache_type == "f32" else ll.GGML_TYPE_F16
    return ctx_params


def _model_info(ll: Any, model: Any, vocab: Any, path: str, n_ctx: int) -> ModelInfo:
    """What the server tells clients about a loaded GGUF model (llama.cpp's handles)."""

    def special(token_id: int) -> int | None:
        return token_id if token_id >= 0 else None

    template = ll.llama_model_chat_template(model, None)
    desc = ctypes.create_string_buffer(256)
    ll.llama_model_desc(model, desc, len(desc))
    return ModelInfo(
        path=str(path),
        n_ctx=n_ctx,
        n_ctx_train=ll.llama_model_n_ctx_train(model),
        n_vocab=ll.llama_vocab_n_tokens(vocab),
        bos_id=special(ll.llama_vocab_bos(vocab)),
        eos_id=special(ll.llama_vocab_eos(vocab)),
        pad_id=special(ll.llama_vocab_pad(vocab)),
        add_bos=bool(ll.llama_vocab_get_add_bos(vocab)),
        chat_template=template.decode() if template else None,
        description=f"{desc.value.decode()}, {ll.llama_model_n_params(model) / 1e6:.0f}M params",
    )


def consecutive_passes(steps: Sequence[Step], most: int) -> list[list[Step]]:
    """Decode passes of at most `most` rows as llama.cpp runs them: with a KV stream per sequence,
    one pass carries sequences of consecutive ids, ascending (it splits any other batch so), so
    runs of consecutive ids, cut at `most`; all of `steps` in one call, ascending, when they fit
    (llama.cpp then splits them at the gaps itself)."""
    if len(steps) <= most:
        return [sorted(steps, key=lambda s: s.seq)]
    passes: list[list[Step]] = []
    for step in sorted(steps, key=lambda s: s.seq):
        last = passes[-1] if passes else None
        if last is not None and step.seq == last[-1].seq + 1 and len(last) < most:
            last.append(step)
        else:
            passes.append([step])
    return passes


class GGUFBackend(Backend):
    kind = "gguf"
    supports_snapshots = True
    # Q4_1, Q8_0, F16, F32: any tail; K-quant and repacked files: 8+ tokens at multiples of 4; 16/16: other CPUs'.
    reuse_rules = (ReuseRule(1, 2), ReuseRule(4, 8), ReuseRule(16, 16))

    def __init__(
        self,
        path: str,
        n_ctx: int = 0,
        n_threads: int = 1,
        n_batch: int = 512,
        kv_cache_type: str = "f32",
        max_sequences: int = 1,
    ):
        # Imported here so that the package imports (and --help works) without llama.cpp built.
        import llama_cpp

        # llama.cpp logs every tensor at load; keep errors only (ours says what matters).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self._ll = ll = llama_cpp
        ll.llama_backend_init()

        model_params = ll.llama_model_default_params()
        self._model = ll.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {path}; is it a complete, supported GGUF file?")
        self._vocab = ll.llama_model_get_vocab(self._model)

        n_ctx_train = ll.llama_model_n_ctx_train(self._model)
        n_ctx = default_context(n_ctx, n_ctx_train)
        self.n_batch = min(n_batch, n_ctx)

        self.max_sequences, self.kv_cache_type = max_sequences, kv_cache_type
        self.scoring_threads = n_threads  # the forward pass waits while its logits are scored
        ctx_params = _context_params(ll, n_ctx, self.n_batch, n_threads, kv_cache_type, max_sequences)
        self._ctx = ll.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            raise ValueError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self._memory = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)  # each token belongs to one sequence

        n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self.tokens = TokenTable(
            [self._piece(t) for t in range(n_vocab)],
            [t for t in range(n_vocab) if ll.llama_vocab_is_eog(self._vocab, t)],
        )
        self.info = _model_info(ll, self._model, self._vocab, path, ll.llama_n_ctx(self._ctx) // max_sequences)

    def fingerprint_parts(self) -> dict[str, str]:
        return {
            "llama_cpp_python": self._ll.__version__,
            # The instruction sets and options this build of llama.cpp uses (AVX2, AVX512, ...).
            "llama_cpp_system_info": self._ll.llama_print_system_info().decode(errors="replace").strip(" |"),
            "flash_attn": "off",  # turned off in __init__: its CPU kernel is not exact
            "kv_cache_type": self.kv_cache_type,
        }

    def close(self) -> None:
        ll = self._ll
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            ll.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            ll.llama_model_free(self._model)
            self._model = None

    # -- tokenizer --------------------------------------------------------------------------
    def _piece(self, token_id: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
        if n < 0:  # buffer too small: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
        return buf.raw[:n]

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (self._ll.llama_token * capacity)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), out, capacity, add_special_tokens, True)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def release(self, seq: int) -> None:
        self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)

    # -- prefix cache -------------------------------------------------------------------------
    def snapshot(self, seq: int) -> tuple[object, int]:
        size = self._ll.llama_state_seq_get_size(self._ctx, seq)
        state = (ctypes.c_uint8 * size)()
        written = self._ll.llama_state_seq_get_data(self._ctx, state, size, seq)
        return state, written

    def restore(self, seq: int, state: Any, n_tokens: int) -> None:
        ll = self._ll
        ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
        if ll.llama_state_seq_set_data(self._ctx, state, len(state), seq) == 0:
            raise RuntimeError("llama.cpp could not restore a cached KV state")
        ll.llama_memory_seq_rm(self._memory, seq, n_tokens, -1)

    # -- forward passes -----------------------------------------------------------------------
    def prefill(self, seq: int, tokens: Sequence[int], start: int, logits_from: int) -> npt.NDArray[np.float32] | None:
        self._ll.llama_memory_seq_rm(self._memory, seq, start, -1)
        self._decode((seq, token, start + i, i >= logits_from) for i, token in enumerate(tokens))
        n_out = len(tokens) - logits_from
        return self._logits(n_out) if n_out > 0 else None

    def decode(self, steps: Sequence[Step]) -> npt.NDArray[np.float32]:
        out = np.empty((len(steps), self.info.n_vocab), dtype=np.float32)
        for lo in range(0, len(steps), self.n_batch):
            part = steps[lo : lo + self.n_batch]
            self._decode((s.seq, s.token, s.position, True) for s in part)
            out[lo : lo + len(part)] = self._logits(len(part))
        return out

    def decode_passes(self, steps: Sequence[Step], most: int) -> list[list[Step]]:
        return consecutive_passes(steps, most)

    def _decode(self, entries: Iterable[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (sequence, token, position, wants logits) entries, at most n_batch."""
        batch = self._batch
        n = 0
        for j, (seq, token, position, wanted) in enumerate(entries):
            batch.token[j] = token
            batch.pos[j] = position
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = seq
            batch.logits[j] = wanted
            n = j + 1
        batch.n_tokens = n
        status = self._ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _logits(self, n_out: int) -> npt.NDArray[np.float32]:
        """The rows of the last decode's flagged tokens, in batch order: a view of llama.cpp's
        buffer, valid until the next decode."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits(self._ctx), shape=(n_out, self.info.n_vocab))

"""GGUF models through llama.cpp, driven by llama-cpp-python's low-level (C) API.

The high-level `Llama` class is not used: it keeps an n_batch x n_vocab (or n_ctx x n_vocab)
logits buffer and samples in Python. Here a llama_batch asks llama.cpp for logits only at the
positions a response needs, and they are read straight out of llama.cpp's own buffer.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from server.backends.base import Backend, ModelInfo, Pass

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MAX_DEFAULT_CTX = 8192  # n_ctx=0 means the training context, capped here to bound KV memory


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class GGUFBackend(Backend):
    supports_snapshots = True

    def __init__(self, path: str, n_ctx: int = 0, n_threads: int = 1, n_batch: int = 512,
                 kv_cache_type: str = "f32", max_sequences: int = 1):
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
        n_ctx = n_ctx or min(n_ctx_train, MAX_DEFAULT_CTX)
        self.n_batch = min(n_batch, n_ctx)

        ctx_params = ll.llama_context_default_params()
        # Each sequence gets its own KV stream of n_ctx cells. (llama.cpp's unified KV cache, one
        # pool shared by all sequences, moved logits by up to 1.3 whenever another sequence held
        # cells in it, in this build; separate streams give the same numbers as one sequence alone.)
        ctx_params.n_ctx = n_ctx * max_sequences
        ctx_params.n_seq_max = self.max_sequences = max_sequences
        ctx_params.kv_unified = False
        ctx_params.n_batch = self.n_batch
        ctx_params.n_ubatch = self.n_batch
        ctx_params.n_threads = n_threads
        ctx_params.n_threads_batch = n_threads
        self.scoring_threads = n_threads  # the forward pass waits while its logits are scored
        # llama.cpp's default (auto) turns flash attention on for CPUs, whose kernel accumulates in
        # float16: logits moved by up to 1.0 on SmolLM2 (logprobs by 0.1). Scores must be exact.
        ctx_params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # llama.cpp stores K and V in float16 by default; float32 keeps scores exact (see Settings).
        kv_type = ll.GGML_TYPE_F32 if kv_cache_type == "f32" else ll.GGML_TYPE_F16
        ctx_params.type_k = ctx_params.type_v = kv_type
        self._ctx = ll.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            raise ValueError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self._memory = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)  # each token belongs to one sequence

        n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._pieces = [self._piece(t) for t in range(n_vocab)]
        self._eog = np.array([ll.llama_vocab_is_eog(self._vocab, t) for t in range(n_vocab)], dtype=bool)

        def special(token_id: int) -> int | None:
            return token_id if token_id >= 0 else None

        template = ll.llama_model_chat_template(self._model, None)
        desc = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self._model, desc, len(desc))
        self.info = ModelInfo(
            path=str(path),
            n_ctx=ll.llama_n_ctx(self._ctx) // max_sequences,
            n_ctx_train=n_ctx_train,
            n_vocab=n_vocab,
            bos_id=special(ll.llama_vocab_bos(self._vocab)),
            eos_id=special(ll.llama_vocab_eos(self._vocab)),
            pad_id=special(ll.llama_vocab_pad(self._vocab)),
            add_bos=bool(ll.llama_vocab_get_add_bos(self._vocab)),
            chat_template=template.decode() if template else None,
            description=f"{desc.value.decode()}, {ll.llama_model_n_params(self._model) / 1e6:.0f}M params",
        )

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

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id]

    def is_end_of_generation(self, token_id: int) -> bool:
        return bool(self._eog[token_id])

    def release(self, seq: int) -> None:
        self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)

    # -- prefix cache -------------------------------------------------------------------------
    def snapshot(self, seq: int) -> tuple[object, int]:
        size = self._ll.llama_state_seq_get_size(self._ctx, seq)
        state = (ctypes.c_uint8 * size)()
        written = self._ll.llama_state_seq_get_data(self._ctx, state, size, seq)
        return state, written

    def restore(self, seq: int, state, n_tokens: int) -> None:
        ll = self._ll
        ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
        if ll.llama_state_seq_set_data(self._ctx, state, len(state), seq) == 0:
            raise RuntimeError("llama.cpp could not restore a cached KV state")
        ll.llama_memory_seq_rm(self._memory, seq, n_tokens, -1)

    # -- forward pass -------------------------------------------------------------------------
    def forward(self, passes: Sequence[Pass]) -> Iterator[tuple[int, int, np.ndarray]]:
        ll, batch, n_vocab = self._ll, self._batch, self.info.n_vocab
        for p in passes:  # forget what each sequence held from its start on
            ll.llama_memory_seq_rm(self._memory, p.seq, p.start, -1)
        # All passes' tokens, in order, cut into llama_batch-sized chunks that may mix sequences.
        entries = [(index, i) for index, p in enumerate(passes) for i in range(len(p.tokens))]
        for chunk_start in range(0, len(entries), self.n_batch):
            chunk = entries[chunk_start:chunk_start + self.n_batch]
            runs: list[list[int]] = []  # [pass index, first i, rows] of flagged tokens, in batch order
            for j, (index, i) in enumerate(chunk):
                p = passes[index]
                wanted = i >= p.logits_from
                batch.token[j] = p.tokens[i]
                batch.pos[j] = p.start + i
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = p.seq
                batch.logits[j] = wanted
                if wanted:
                    if runs and runs[-1][0] == index:
                        runs[-1][2] += 1
                    else:
                        runs.append([index, i, 1])
            batch.n_tokens = len(chunk)
            status = ll.llama_decode(self._ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            if runs:
                # llama_get_logits returns the flagged tokens' rows in batch order. A view, not a
                # copy: it is valid until the next decode, i.e. until we resume.
                n_out = sum(r[2] for r in runs)
                logits = np.ctypeslib.as_array(ll.llama_get_logits(self._ctx), shape=(n_out, n_vocab))
                row = 0
                for index, first, n in runs:
                    yield index, first, logits[row:row + n]
                    row += n

"""A small, exact fake model for testing the engine and the HTTP layer in-process (the real
backends' numbers are tested against oracles elsewhere).

Its tokenizer is byte-level (ids 0..255 are the bytes; BOS and EOS follow), so any valid text
round-trips, and a string that is not valid Unicode fails to encode exactly as a real tokenizer's
would. Its logits are a fixed function of (token, position), so a test can compute every logprob
a response must carry in float64, independently of the server.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence

import numpy as np

from server.backends.base import Backend, ModelInfo, Step
from server.text.tokens import TokenTable

BOS, EOS = 256, 257
N_VOCAB = 258
SPECIALS = {"<s>": BOS, "</s>": EOS}
SPECIAL = re.compile("(<s>|</s>)")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def fake_logits(tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """The fake model's float32 logits after each (token, position): a fixed pseudo-random table
    row, shifted by the position, with EOS kept unlikely so that generations run their length."""
    table = _TABLE
    rows = table[np.asarray(tokens) % N_VOCAB] + 0.01 * np.asarray(positions, dtype=np.float32)[:, None]
    rows[:, EOS] = -30.0
    return rows.astype(np.float32)


_TABLE = np.random.default_rng(1234).normal(0.0, 3.0, size=(N_VOCAB, N_VOCAB)).astype(np.float32)


class ByteBackend(Backend):
    """The fake model. `delay` seconds per forward pass let a test act while the model is busy."""

    kind = "fake"
    supports_snapshots = True

    def __init__(
        self,
        max_sequences: int = 1,
        n_batch: int = 64,
        n_ctx: int = 512,
        delay: float = 0.0,
        add_bos: bool = True,
        chat_template: str | None = CHAT_TEMPLATE,
    ):
        self.max_sequences, self.n_batch, self.delay = max_sequences, n_batch, delay
        self.info = ModelInfo(
            path="byte-model",
            n_ctx=n_ctx,
            n_ctx_train=n_ctx,
            n_vocab=N_VOCAB,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=None,
            add_bos=add_bos,
            chat_template=chat_template,
            description="byte-level fake",
        )
        self.tokens = TokenTable([bytes([b]) for b in range(256)] + [b"<s>", b"</s>"], [EOS])
        self.lengths: dict[int, int] = {}
        self.lock = threading.Lock()

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Bytes, with "<s>" and "</s>" read as BOS and EOS (special-token text is parsed, as the real
        backends do); a lone surrogate fails to encode, as it does in llama.cpp's tokenizer."""
        ids = []
        for part in SPECIAL.split(text):
            ids += [SPECIALS[part]] if part in SPECIALS else list(part.encode("utf-8"))
        return [BOS, *ids] if add_special_tokens and self.info.add_bos else ids

    def prefill(self, seq, tokens, start, logits_from):
        time.sleep(self.delay)
        with self.lock:
            self.lengths[seq] = start + len(tokens)
        if logits_from >= len(tokens):
            return None
        return fake_logits(tokens[logits_from:], range(start + logits_from, start + len(tokens)))

    def decode(self, steps: Sequence[Step]) -> np.ndarray:
        time.sleep(self.delay)
        with self.lock:
            for s in steps:
                self.lengths[s.seq] = s.position + 1
        return fake_logits([s.token for s in steps], [s.position for s in steps])

    def release(self, seq: int) -> None:
        with self.lock:
            self.lengths.pop(seq, None)

    def snapshot(self, seq):
        return self.lengths[seq], 64

    def restore(self, seq, state, n_tokens):
        with self.lock:
            self.lengths[seq] = n_tokens

    def fingerprint_parts(self) -> dict[str, str]:
        return {"fake_model": "byte-level, table seed 1234"}

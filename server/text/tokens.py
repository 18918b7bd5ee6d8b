"""The model's tokens as the serving layer sees them, built once at load time.

Each backend knows how to read its tokenizer's pieces and end-of-generation ids; this table is
where it puts them, so that every response reads the same three facts from one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from server.text.decoding import token_string


class TokenTable:
    """Token id -> the bytes it stands for, the string responses show for it, and whether it ends
    a generation (EOS and the other end-of-turn tokens)."""

    def __init__(self, pieces: Sequence[bytes], end_of_generation: Iterable[int]):
        self.pieces: list[bytes] = list(pieces)
        self.strings: list[str] = [token_string(p) for p in self.pieces]
        self._eog = np.zeros(len(self.pieces), dtype=bool)
        self._eog[[t for t in end_of_generation if 0 <= t < len(self.pieces)]] = True

    def __len__(self) -> int:
        return len(self.pieces)

    def is_end_of_generation(self, token_id: int) -> bool:
        return bool(self._eog[token_id])

    def text_pieces(self, token_ids: Iterable[int]) -> list[bytes]:
        """Each token's bytes as text: end-of-generation tokens add none (as in vLLM)."""
        return [b"" if self._eog[t] else self.pieces[t] for t in token_ids]

    def detokenize(self, token_ids: Iterable[int]) -> str:
        return b"".join(self.pieces[t] for t in token_ids).decode("utf-8", errors="replace")

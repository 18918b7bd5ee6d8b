"""From token bytes to text: token strings, character offsets, and stop strings.

Tokens are byte strings; one UTF-8 character may be split across tokens. Decoding goes through
one incremental decoder per stream, so a split character appears once, at the token that
completes it, and offsets count characters of the text the client receives.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def token_string(piece: bytes) -> str:
    """The token's text, or OpenAI's `bytes:\\xNN...` form when it is not valid UTF-8 by itself."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def _utf8_decoder():
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def join_pieces(pieces: Sequence[bytes]) -> tuple[str, list[int]]:
    """The text of consecutive tokens, and each token's character offset in it."""
    decoder = _utf8_decoder()
    parts, offsets, length = [], [], 0
    for piece in pieces:
        offsets.append(length)
        part = decoder.decode(piece)
        parts.append(part)
        length += len(part)
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts), offsets


class StopStringWatcher:
    """Accumulates generated text and reports the first stop string, which is cut off."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._decoder = _utf8_decoder()
        self.text = ""
        self.stopped = False

    def feed(self, piece: bytes) -> bool:
        """Add one token's bytes; True once a stop string has appeared (self.text then ends before it)."""
        if self.stopped:
            return True
        before = len(self.text)
        self.text += self._decoder.decode(piece)
        if self.stops:
            # A stop string can span tokens: search from where the newest one could start.
            window = max(map(len, self.stops)) - 1
            lo = max(0, before - window)
            hits = [i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self.text


def unsafe_suffix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string: text that must
    be held back while streaming, since the next token may complete the stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest

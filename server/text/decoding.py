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


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def join_pieces(pieces: Sequence[bytes]) -> tuple[str, list[int]]:
    """The text of consecutive tokens, and each token's character offset in it."""
    decoder = _utf8_decoder()
    parts: list[str] = []
    offsets: list[int] = []
    length = 0
    for piece in pieces:
        offsets.append(length)
        part = decoder.decode(piece)
        parts.append(part)
        length += len(part)
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts), offsets


def _prefix_function(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt: for each i, the length of the longest proper prefix of pattern[:i + 1]
    that is also its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Where stop strings occur in a text that grows at its end, in time linear in the text and the
    stop strings (one Knuth-Morris-Pratt automaton per stop string), however long either grows: a
    search of the whole text, or of every possible stop-string start, at each token would cost
    the square of the text generated so far."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._fail = [_prefix_function(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop string: how much of it the text ends with
        self._length = 0  # characters fed so far

    def feed(self, text: str) -> int | None:
        """Take the text's next characters; the start (in the whole text) of the earliest stop
        string that ends in them, or None. After a hit the matcher is spent."""
        found = None
        for k, (stop, fail) in enumerate(zip(self.stops, self._fail)):
            q = self._matched[k]
            for i, char in enumerate(text):
                while q and stop[q] != char:
                    q = fail[q - 1]
                if stop[q] == char:
                    q += 1
                if q == len(stop):  # this stop's first occurrence: its earliest start too
                    start = self._length + i + 1 - q
                    found = start if found is None else min(found, start)
                    break
            self._matched[k] = q
        self._length += len(text)
        return found

    @property
    def held(self) -> int:
        """The length of the longest end of the text that begins a stop string: text to hold back
        while streaming, since the next token may complete the stop string."""
        return max(self._matched, default=0)


class StopStringWatcher:
    """Accumulates generated text and reports the first stop string, which is cut off."""

    def __init__(self, stops: Sequence[str]):
        self._matcher = StopMatcher(stops)
        self._decoder = _utf8_decoder()
        self.text = ""
        self.stopped = False

    @property
    def held(self) -> int:
        """Characters at the end of `text` that may begin a stop string (0 once stopped)."""
        return 0 if self.stopped else self._matcher.held

    def feed(self, piece: bytes) -> bool:
        """Add one token's bytes; True once a stop string has appeared (self.text then ends before it)."""
        if self.stopped:
            return True
        new = self._decoder.decode(piece)
        self.text += new
        if (start := self._matcher.feed(new)) is not None:
            self.text = self.text[:start]
            self.stopped = True
        return self.stopped

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self.text

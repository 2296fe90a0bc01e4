"""Token ids -> text as it streams: UTF-8 safe (a character split across tokens is held
until it is whole) and stop strings (text up to a stop string, which is never printed;
text that may begin one is held until it is decided)."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextPieces:
    """Token ids pushed in one at a time -> text ready to show, honouring stop strings.

    One per completion: the engine's caller pushes each row's ids into the row's own.
    ``stopped`` turns True once a stop string has appeared.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that ``token`` makes final ("" while it could still be held back)."""
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        hold = 0
        if self.stops:
            cut = _stop_index(self.pending, self.stops)
            if cut is not None:
                self.stopped = True
                out, self.pending = self.pending[:cut], ""
                return out
            hold = _partial_stop(self.pending, self.stops)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def finish(self) -> str:
        """What is left once no token follows (a dangling partial character -> U+FFFD)."""
        if self.stopped:
            return ""
        pending, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        if self.stops:
            cut = _stop_index(pending, self.stops)
            pending = pending if cut is None else pending[:cut]
        return pending

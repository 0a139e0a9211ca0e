"""Incremental text assembly for a token stream: UTF-8 split across tokens and stop
strings split across tokens are both held back until they are decided."""

from __future__ import annotations

import codecs


class StopScanner:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """Add a token's bytes; return the text now safe to emit and whether a stop
        string was reached (the stop string itself is never emitted)."""
        if not self.stops:  # nothing to hold back but a character's first bytes
            return self.decoder.decode(piece), False
        self.pending += self.decoder.decode(piece)
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.pending = self.pending[:cut], ""
            return text, True
        hold = self._partial_stop_length()
        text = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return text, False

    def flush(self) -> str:
        """The held-back text, when the stream ends for another reason."""
        text = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return text

    def _partial_stop_length(self) -> int:
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest

"""Token ids -> text deltas that are safe to show, and stop strings that never leak.

IncrementalDetokenizer decodes a short window of ids and emits only what the window
adds, holding back while the text ends in an incomplete UTF-8 character (decoded as
U+FFFD). The window starts inside the prompt, so a SentencePiece token's leading
space is kept. StopMatcher holds back any tail that could still become a stop
string, so a stream never shows text past a stop and never loses text before it.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is shown as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            cut, self.pending = self.pending[: min(hits)], ""
            return cut, True
        keep = self._partial_stop_length()
        ready = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return ready, False

    def flush(self, text: str = "") -> str:
        """End of generation: emit what was held back (it did not become a stop)."""
        ready, hit = self.feed(text)
        if hit:
            return ready
        ready, self.pending = ready + self.pending, ""
        return ready

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of pending text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:length]):
                    best = length
                    break
        return best

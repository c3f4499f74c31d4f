"""A completion's text, token by token: incremental decoding and `stop` strings."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CompletionText"]

_INCOMPLETE = "\ufffd"  # what decode() gives for the first bytes of a multi-byte character


class CompletionText:
    """Turns generated tokens into text deltas that are safe to send.

    Decoding one token at a time is wrong twice over: a character can span several tokens,
    and some tokenizers drop a token's leading space when it is decoded alone. So each
    delta is the difference between decoding a short window of recent tokens with and
    without the newest ones. A delta is held back while its end could be the start of a
    stop string, and the text ends just before the first stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer, self._stop = tokenizer, tuple(stop)
        self._ids: list[int] = []
        self._window_start = self._read = 0  # token offsets: decode window, tokens in text
        self.text = ""  # decoded so far, cut at a stop string
        self._sent = 0  # characters of text already returned as deltas
        self.stopped = False  # a stop string was reached

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a generated token; returns the text that can be sent now (maybe empty)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._window_start:self._read])
        after = self._decode(self._ids[self._window_start:])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""  # nothing printable yet
        self.text += after[len(before):]
        self._window_start, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """The text still held back, once generation has ended."""
        return self._take(len(self.text))

    def _release(self) -> str:
        # No stop string starts in the text already sent: any end of the text that could
        # begin one is held back.
        hits = [i for i in (self.text.find(s, self._sent) for s in self._stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        return self._take(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        ends = [n for s in self._stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                if self.text.endswith(s[:n])]
        return max(ends, default=0)

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        delta, self._sent = self.text[self._sent:end], end
        return delta

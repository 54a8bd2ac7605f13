"""Text deltas for a streaming request: decode the whole output so far, send only what is settled.

Two parts of a decoded text may still change when the next token comes, so they are held back:
a trailing U+FFFD (the first bytes of a character whose other bytes are still to be sampled),
and the last characters that could begin a stop string (the engine cuts the text where a stop
string starts, so they may never be part of the answer). At the end the engine's final text is
the truth; what was sent is always a prefix of it, so the deltas add up to the non-streamed text.
"""
from __future__ import annotations

from typing import Sequence

from framework.engine.detokenizer import REPLACEMENT


class TextStream:
    def __init__(self, stop: Sequence[str]):
        # a stop string that is not complete yet starts within its length - 1 last characters
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""

    def delta(self, text: str, final: bool = False) -> str:
        """The new part of `text` that can be sent now ("" when there is none)."""
        if not final:
            text = text.rstrip(REPLACEMENT)
            text = text[:max(0, len(text) - self.hold)]
        # A byte-level decode only grows, so `sent` is a prefix; were it not (a tokenizer that
        # rewrites earlier text), sending nothing more beats sending text that contradicts it.
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

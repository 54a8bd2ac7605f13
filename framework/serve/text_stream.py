"""Text deltas for a streaming request: decode the whole output so far, send only what is settled.

Two parts of a decoded text may still change when the next token comes, so they are held back:
a trailing U+FFFD (the first bytes of a character whose other bytes are still to be sampled),
and the last characters that could begin a stop string (the engine cuts the text where a stop
string starts, so they may never be part of the answer). At the end the engine's final text is
the truth; what was sent is always a prefix of it, so the deltas add up to the non-streamed text.
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


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


class IncrementalDecoder:
    """The text of a growing token list, decoding only a few tokens a step instead of all of them
    (a full decode per step costs O(length) each, O(length^2) a request: at 256 streams of long
    outputs that is the event loop's whole time).

    Each step decodes the window from `prefix` (the last settled token boundary) twice, without
    and with the new tokens; the difference is the new text. Decoding a window rather than a
    single token keeps what depends on neighbours right (SentencePiece's leading space, bytes of
    one character split across tokens: the text waits while it ends in U+FFFD)."""

    def __init__(self, decode):
        self.decode = decode  # token ids -> text (skip_special_tokens, as the engine decodes)
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text is in `text`
        self.text = ""

    def update(self, token_ids) -> str:
        """The text of `token_ids` (which extend the ids given before)."""
        if len(token_ids) <= self.read:
            return self.text
        settled = self.decode(token_ids[self.prefix:self.read])
        window = self.decode(token_ids[self.prefix:])
        if len(window) > len(settled) and not window.endswith(REPLACEMENT):
            self.text += window[len(settled):]
            self.prefix, self.read = self.read, len(token_ids)
        return self.text

"""Text of a growing token list at a few tokens' cost a step (streams, stop strings)."""
from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a byte-level decode shows for the first bytes of an unfinished character


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

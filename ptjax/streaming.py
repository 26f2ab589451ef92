"""Printing a completion while the sampler produces it, and cutting it at stop strings.

`sampling.generate(..., on_token=Streamer(...))` calls the streamer once per step with the new
tokens; the streamer prints row 0's text as it grows and tells the sampler when a stop string has
appeared, so generation ends there instead of at `max_new_tokens`.
"""

from __future__ import annotations

import sys

import numpy as np


class Streamer:
    """Host side of the sampler's per-token callback: prints text as it arrives, ends on stops.

    Why a class: text must be decoded from all ids so far (a token may complete a multi-byte
    character), and a stop string may span tokens, so the printed length and the ids are state.
    Text that could still turn into a stop string, or an incomplete character, is held back.
    """

    def __init__(self, tokenizer, stop_strings=(), out=sys.stdout):
        self.tokenizer = tokenizer
        self.stop_ids = set(getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))
        self.stop_strings = [s for s in stop_strings if s]
        self.out = out
        self.reset()

    def reset(self):
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The completion so far, cut at the first stop string."""
        text = self.tokenizer.decode(self.ids)
        for stop in self.stop_strings:
            if stop in text:
                text = text[:text.index(stop)]
        return text

    def _safe_length(self, text: str) -> int:
        """How much of `text` can be printed now without ever having to be taken back."""
        end = len(text.rstrip("\ufffd"))
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return end

    def __call__(self, tokens, active) -> np.ndarray:
        """Take row 0's new token; returns per-row "stop now" flags for the sampler."""
        token, live = int(np.asarray(tokens)[0]), bool(np.asarray(active)[0])
        if live and not self.stopped and token not in self.stop_ids:
            self.ids.append(token)
            full = self.tokenizer.decode(self.ids)
            self.stopped = any(stop in full for stop in self.stop_strings)
            text = self.text
            end = len(text) if self.stopped else self._safe_length(text)
            if end > self.printed:
                self.out.write(text[self.printed:end])
                self.out.flush()
                self.printed = end
        return np.full(np.shape(tokens), self.stopped, bool)

    def finish(self) -> str:
        """Print whatever was held back and return the completion."""
        text = self.text
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        return text

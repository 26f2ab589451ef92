"""Tokenizers with one small interface: ids of the special tokens, `encode` and `decode`.

`ByteTokenizer` needs no files, so tests and the embedded demo run anywhere; `HFTokenizer` wraps a
Hugging Face `tokenizer.json` for real checkpoints. Neither adds special tokens in `encode`: the
encoders in `encode.py` place BOS/EOS themselves, so the layout of a training sequence is decided
in one place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Protocol

import tokenizers


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (for type hints only)."""

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..2 are PAD, BOS, EOS and byte b is id b + 3.

    Every string is representable and nothing has to be downloaded, which makes it the tokenizer of
    the tests and of the from-scratch demo.
    """

    PAD = 0
    BOS = 1
    EOS = 2
    OFFSET = 3

    def __init__(self):
        self.pad_id = self.PAD
        self.bos_id = self.BOS
        self.eos_id = self.EOS
        self.vocab_size = 256 + self.OFFSET

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`'s UTF-8 bytes, without BOS/EOS (the sequence encoders add those)."""
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, dropping special ids and ids past the byte range.

        Models often pad their vocabulary beyond 259 rows, so a sampler can emit such ids; they
        carry no text and are skipped. Invalid UTF-8 (e.g. a sequence cut mid-character) becomes
        U+FFFD rather than an exception, since decoding is for reading model output.
        """
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


# Token strings that conventionally play each role, most specific first. A tokenizer config beside
# tokenizer.json, when present, takes precedence over these guesses.
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _configured_special_tokens(folder: str) -> dict[str, str]:
    """Special-token strings named in `tokenizer_config.json` / `special_tokens_map.json`.

    Hugging Face folders record which token is BOS/EOS/PAD there, either as a plain string or as an
    `{"content": ...}` object; `tokenizer_config.json` wins where both name one.
    """
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            continue
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value and key not in found:
                found[key] = value
    return found


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer behind the same interface as `ByteTokenizer`.

    `path` is a `tokenizer.json` file or a folder holding one. The special ids come from the
    folder's tokenizer config when it names them, else from conventional token strings; a tokenizer
    without PAD pads with EOS (the loss mask hides padding anyway), and one without BOS starts
    sequences with EOS, as GPT-2-style tokenizers do.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.path = file
        self.tokenizer = tokenizers.Tokenizer.from_file(file)
        configured = _configured_special_tokens(os.path.dirname(os.path.abspath(file)))

        def find(key: str, candidates: tuple[str, ...]) -> int | None:
            names = ([configured[key]] if key in configured else []) + list(candidates)
            for name in names:
                token_id = self.tokenizer.token_to_id(name)
                if token_id is not None:
                    return token_id
            return None

        eos = find("eos_token", EOS_CANDIDATES)
        if eos is None:
            raise ValueError(
                f"{file}: cannot find an end-of-sequence token (tried the tokenizer config and "
                f"{', '.join(EOS_CANDIDATES)}); add eos_token to tokenizer_config.json beside it"
            )
        bos = find("bos_token", BOS_CANDIDATES)
        pad = find("pad_token", PAD_CANDIDATES)
        self.eos_id = eos
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (the sequence encoders add BOS/EOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with special tokens skipped, for reading model output."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(name_or_path: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a config names: None, "" or "byte" for bytes, else a tokenizer.json path.

    One entry point so configs can switch between the file-free demo tokenizer and a checkpoint's
    own tokenizer with a single string.
    """
    if name_or_path is None or name_or_path in ("", "byte"):
        return ByteTokenizer()
    return HFTokenizer(name_or_path)

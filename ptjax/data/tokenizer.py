"""Tokenizers with one small interface: special ids, chat template, `encode` and `decode`.

`ByteTokenizer` needs no files, so tests and the embedded demo run anywhere; `HFTokenizer` wraps a
Hugging Face `tokenizers.Tokenizer` for real checkpoints, built from a model folder
(`HFTokenizer.from_folder`) or from parts (what a GGUF reader does). Neither adds special tokens in
`encode`: the encoders in `encode.py` place BOS/EOS themselves, so the layout of a training sequence
is decided in one place.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import tokenizers


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (for type hints only).

    `stop_ids` are the ids that end a generated reply (`eos_id` first); `add_bos` says whether the
    model's sequences start with `bos_id`; `chat_template` is the model's Jinja chat template, or
    None for the plain `<|role|>` layout; `bos_token`/`eos_token` are the texts a template writes
    for those tokens ("" when there is none).
    """

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int
    stop_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    bos_token: str
    eos_token: str
    source: str

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..2 are PAD, BOS, EOS and byte b is id b + 3.

    Every string is representable and nothing has to be downloaded, which makes it the tokenizer of
    the tests and of the from-scratch demo. It has no chat template (chats use the plain `<|role|>`
    layout) and always starts sequences with BOS.
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
        self.stop_ids = (self.EOS,)
        self.add_bos = True
        self.chat_template = None
        self.bos_token = ""
        self.eos_token = ""
        self.source = "byte"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`'s UTF-8 bytes, without BOS/EOS (the sequence encoders add those)."""
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and, per token, the `(start, end)` character span of `text` it came from.

        Every byte of a multi-byte character carries that character's span, so a loss mask built
        from character positions never splits a character.
        """
        ids, offsets = [], []
        for i, char in enumerate(text):
            data = char.encode("utf-8")
            ids += [b + self.OFFSET for b in data]
            offsets += [(i, i + 1)] * len(data)
        return ids, offsets

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, dropping special ids and ids past the byte range.

        Models often pad their vocabulary beyond 259 rows, so a sampler can emit such ids; they
        carry no text and are skipped. Invalid UTF-8 (e.g. a sequence cut mid-character) becomes
        U+FFFD rather than an exception, since decoding is for reading model output.
        """
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind the same interface as `ByteTokenizer`.

    Built from parts, so any source (a model folder via `from_folder`, a GGUF file's vocabulary)
    ends in the same object. A tokenizer without PAD pads with EOS (the loss mask hides padding
    anyway); one without BOS has `bos_id == eos_id` as a filler id (GPT-2 style) and `add_bos`
    False, so no sequence starts with it. `stop_ids` is `eos_id` followed by the other `eos_ids`
    (chat models end turns with a token other than their document EOS). `source` names where the
    tokenizer came from in error messages.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        eos_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos: bool = True,
        source: str = "",
    ):
        self.source = source or "tokenizer"
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

        def token_id(name: str, value):
            """`value` as a Python int, checked to be an id of this tokenizer."""
            if value is None:
                return None
            try:
                index = operator.index(value)  # ints and NumPy integers, not floats or bools
            except TypeError:
                index = None
            if (isinstance(value, bool) or index is None or index < 0
                    or tokenizer.id_to_token(index) is None):
                raise ValueError(f"{self.source}: {name}={value!r} is not a token id of this "
                                 f"tokenizer (vocabulary of {self.vocab_size})")
            return index

        eos_id = token_id("eos_id", eos_id)
        bos_id = token_id("bos_id", bos_id)
        pad_id = token_id("pad_id", pad_id)
        eos_ids = [token_id(f"eos_ids[{i}]", v) for i, v in enumerate(eos_ids)]
        if eos_id is None:
            raise ValueError(f"{self.source}: eos_id is required")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"{self.source}: chat_template must be a string, "
                             f"got {type(chat_template).__name__}")
        self.eos_id = eos_id
        self.bos_id = eos_id if bos_id is None else bos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.stop_ids = tuple(dict.fromkeys([eos_id, *eos_ids]))
        self.chat_template = chat_template
        self.bos_token = "" if bos_id is None else tokenizer.id_to_token(bos_id)
        self.eos_token = tokenizer.id_to_token(eos_id)
        # Offsets must say where each token's text starts. A ByteLevel post-processor with
        # trim_offsets moves starts past leading spaces, which would shift a loss-mask boundary
        # (" yes" would seem to start after its space). Without special tokens a post-processor
        # changes nothing else, so encoding runs on a copy without one.
        self._plain = tokenizer
        if tokenizer.post_processor is not None:
            self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
            self._plain.post_processor = None

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer of a Hugging Face model folder (or of a `tokenizer.json` path in one).

        Reads beside `tokenizer.json`: the BOS/EOS/PAD tokens and `add_bos_token` from
        `tokenizer_config.json` / `special_tokens_map.json` (else conventional token strings, and
        whether the tokenizer's post-processor puts BOS in front, which is what transformers does:
        Llama 3 starts with BOS, SmolLM2 and Qwen2 do not); the chat template from
        `chat_template.jinja` (newer transformers) or `tokenizer_config.json` (a string, or a list
        of named templates of which "default" is used); and `eos_token_id` (an int or a list) from
        `generation_config.json` as extra stop ids.
        """
        source = os.fspath(path)
        file = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else source
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {source}")
        folder = os.path.dirname(os.path.abspath(file))
        try:
            raw = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the Rust side reports parse errors as a bare Exception
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
        config = _read_json_object(os.path.join(folder, "tokenizer_config.json")) or {}
        token_map = _read_json_object(os.path.join(folder, "special_tokens_map.json")) or {}

        def find(key: str, candidates: tuple[str, ...]) -> int | None:
            names = [_token_text(config.get(key)), _token_text(token_map.get(key))]
            names = [name for name in names if name]
            if not names and key in config and config[key] is None and key != "eos_token":
                return None  # `"bos_token": null` (Qwen2) says there is none: guess nothing
            for name in names + list(candidates):
                token_id = raw.token_to_id(name)
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
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos is not None and raw.encode("", add_special_tokens=True).ids[:1] == [bos]
        return cls(
            raw,
            eos_id=eos,
            bos_id=bos,
            pad_id=find("pad_token", PAD_CANDIDATES),
            eos_ids=_generation_eos_ids(os.path.join(folder, "generation_config.json")),
            chat_template=_chat_template(folder, config),
            add_bos=add_bos,
            source=source,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without added BOS/EOS (special tokens written in it are kept)."""
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and, per token, the `(start, end)` character span of `text` it covers.

        Lets the encoders tokenize a whole rendered conversation once (so token boundaries are the
        ones the model saw in pretraining) and still find which tokens belong to which turn.
        """
        encoding = self._plain.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with special tokens skipped, for reading model output."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


BPE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2, as in ByteTokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, folder: str | os.PathLike) -> HFTokenizer:
    """A byte-level BPE tokenizer learned from `texts`, saved as a model folder and loaded back.

    Why: a model trained from scratch on a narrow corpus learns far faster when a word is one or
    a few tokens instead of one per byte: sequences are about 3x shorter, and copying a word from
    the context (what reading retrieved passages needs) is copying one token. GPT-2's scheme
    (`tokenizers`' ByteLevel pre-tokenizer and decoder: every string is representable, a word
    carries its leading space), with `<pad>`, `<s>`, `</s>` as ids 0, 1, 2 and BOS added.
    `folder` gets `tokenizer.json` and `tokenizer_config.json`, so `load_tokenizer(folder)` and
    any Hugging Face tool read it; both are written under temporary names and renamed, so an
    interrupted run never leaves half a tokenizer.
    """
    if vocab_size <= 256 + len(BPE_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the 256 byte symbols and "
                         f"{len(BPE_SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    pad, bos, eos = BPE_SPECIAL_TOKENS
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "add_bos_token": True}
    os.makedirs(folder, exist_ok=True)
    for name, text in (("tokenizer.json", tokenizer.to_str()),
                       ("tokenizer_config.json", json.dumps(config, indent=1))):
        path = os.path.join(folder, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return HFTokenizer.from_folder(folder)


# Token strings that conventionally play each role, most specific first. A tokenizer config beside
# tokenizer.json, when present, takes precedence over these guesses.
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _read_json_object(path: str) -> dict | None:
    """The JSON object in `path`, None when the file does not exist; errors name the file."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a plain string or an `{"content": ...}` object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(folder: str, config: dict) -> str | None:
    """The folder's default chat template, or None when it has none.

    `chat_template.jinja` wins over `tokenizer_config.json`, as in transformers. A config list of
    named templates without a "default" is an error rather than a silent fallback to the plain
    layout, which would train a chat model on a format it never saw.
    """
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    where = os.path.join(folder, "tokenizer_config.json")
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for i, entry in enumerate(value):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"{where}: chat_template[{i}] must be an object with string "
                                 "fields 'name' and 'template'")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise ValueError(f"{where}: chat_template lists templates {sorted(named)} but none "
                             "named 'default'")
        return named["default"]
    raise ValueError(f"{where}: chat_template must be a string or a list of named templates, "
                     f"got {type(value).__name__}")


def _generation_eos_ids(path: str) -> list[int]:
    """`eos_token_id` of a `generation_config.json` (an int, a list of ints or absent) as a list."""
    config = _read_json_object(path) or {}
    value = config.get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {value!r}")
    return values


def load_tokenizer(name_or_path: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a config names: None, "" or "byte" for bytes, else a model folder (or its
    tokenizer.json).

    One entry point so configs can switch between the file-free demo tokenizer and a checkpoint's
    own tokenizer with a single string.
    """
    if name_or_path is None or name_or_path in ("", "byte"):
        return ByteTokenizer()
    return HFTokenizer.from_folder(name_or_path)

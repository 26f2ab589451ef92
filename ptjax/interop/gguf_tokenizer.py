"""A Hugging Face `tokenizers.Tokenizer` from a GGUF file's tokenizer fields, and those fields back.

A GGUF carries no `tokenizer.json`: llama.cpp's converter stores the vocabulary, the merges, a
type per token, the special ids and a *name* for the pre-tokenizer (`tokenizer.ggml.pre`), and each
reader has to know which text splitting that name stands for. This module keeps that knowledge in
one table (`PRE_TOKENIZERS`) so that a model loaded from a GGUF tokenizes exactly as it was
trained, and so that an exported GGUF tells llama.cpp the right name.

Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM2, Llama 3, Qwen2, GPT-2) is built.
SentencePiece vocabularies (`"llama"`) are refused: rebuilding them needs scores, byte fallback
and Metaspace settings whose exact combination differs by model family, and a near miss would
silently change token ids.

Where the references disagree, this module follows the model's own `tokenizer.json` (what the
model was trained with), which is also what llama.cpp does except for Qwen2's NFC:

- `smollm`: SmolLM2's tokenizer.json isolates every digit before the GPT-2 byte-level regex
  (`Digits(individual_digits=True)`), and llama.cpp's `smollm` regex list starts with `\\p{N}`.
  transformers' GGUF converter (5.x) drops the digit step. Since no merge of SmolLM2 touches a
  digit, the two agree on most text, but not where a run of whitespace precedes a digit:
  "a  1" is [a, ĠĠ, 1] for the model and [a, Ġ, Ġ, 1] for transformers.
- `llama-bpe`: Llama 3's tokenizer.json sets `ignore_merges=True` (a pre-token that is itself in
  the vocabulary is one token, as in tiktoken, which trained it), and so does llama.cpp;
  transformers' GGUF converter leaves it False.
- `qwen2`: Qwen2's tokenizer.json normalizes to NFC first; llama.cpp and transformers' GGUF
  converter do not. Only text in decomposed Unicode (e.g. "e" + U+0301) is affected.
- A token marked control (3) or user-defined (4) becomes an added token (control ones special)
  whatever its spelling, as llama.cpp matches them; transformers skips a control token spelled
  outside the byte-level alphabet (e.g. DeepSeek's "<｜end▁of▁sentence｜>").

No post-processor is attached: the encoders in `ptjax/data` place BOS/EOS themselves from
`add_bos`/`add_eos`, so the layout of a sequence is decided in one place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

if TYPE_CHECKING:
    import gguf

# `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

KEY = "tokenizer.ggml."
TOO_MANY_EOS = "a GGUF records at most three end ids (EOS, end-of-turn, end-of-message)"

# The pre-tokenizer regexes exactly as the models' tokenizer.json files spell them (llama.cpp
# keeps equivalent rewrites of the same patterns for its own regex engine).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """What one `tokenizer.ggml.pre` name means, in Hugging Face terms.

    The components are factories: tokenizers shares a component between the tokenizers it is
    assigned to, so each build gets fresh ones that a caller may change without touching the table.
    `add_bos` is llama.cpp's default for the name when the file has no `add_bos_token` field.
    """

    name: str
    aliases: tuple[str, ...]
    normalizer: Callable[[], normalizers.Normalizer] | None
    pre_tokenizer: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool
    add_bos: bool


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    """A tiktoken-style regex split followed by the byte-to-character mapping (no second regex)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer(
        name="smollm",
        aliases=(),
        normalizer=None,
        pre_tokenizer=lambda: pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ),
        ignore_merges=False,
        add_bos=False,
    ),
    PreTokenizer(
        name="llama-bpe",
        aliases=("llama3", "llama-v3"),
        normalizer=None,
        pre_tokenizer=lambda: _split_then_bytes(LLAMA3_SPLIT),
        ignore_merges=True,
        add_bos=True,
    ),
    PreTokenizer(
        name="qwen2",
        aliases=(),
        normalizer=normalizers.NFC,
        pre_tokenizer=lambda: _split_then_bytes(QWEN2_SPLIT),
        ignore_merges=False,
        add_bos=False,
    ),
    PreTokenizer(
        name="gpt-2",
        aliases=("gpt2",),
        normalizer=None,
        pre_tokenizer=lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ignore_merges=False,
        add_bos=False,
    ),
)

SUPPORTED_PRE = tuple(name for entry in PRE_TOKENIZERS for name in (entry.name, *entry.aliases))


@dataclass(frozen=True)
class GGUFVocab:
    """A tokenizer plus the facts about it that a GGUF file records beside the vocabulary.

    `eos_ids` lists every id that ends generation (EOS first, then end-of-turn / end-of-message),
    so a sampler can stop on `<|eot_id|>` as well as `<|end_of_text|>`. `pre` is the canonical
    llama.cpp name of the pre-tokenizer, the one written back on export.
    """

    tokenizer: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int
    eos_ids: tuple[int, ...]
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    pre: str


def _pre_entry(pre: str) -> PreTokenizer | None:
    """The table entry named `pre` (by its canonical name or an alias), or None."""
    for entry in PRE_TOKENIZERS:
        if pre == entry.name or pre in entry.aliases:
            return entry
    return None


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the spelling of every byte-level BPE token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _special_id(metadata: Mapping[str, Any], field: str, n_tokens: int, source: str) -> int | None:
    """`tokenizer.ggml.<field>` as a token id, None when absent; an id outside the vocabulary is an
    error because every later lookup of that token would fail far from its cause."""
    key = KEY + field
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        raise ValueError(f"{source}: {key} = {value!r} is not a token id of the {n_tokens}-token vocabulary")
    return value


def _flag(metadata: Mapping[str, Any], field: str, default: bool, source: str) -> bool:
    """A boolean tokenizer field, `default` when absent (llama.cpp's default for the vocabulary)."""
    key = KEY + field
    value = metadata.get(key, default)
    if not isinstance(value, bool | int):
        raise ValueError(f"{source}: {key} = {value!r} is not a boolean")
    return bool(value)


def _string_list(metadata: Mapping[str, Any], field: str, source: str) -> list[str]:
    """A required list-of-strings field (tokens, merges), with an error naming it when missing."""
    key = KEY + field
    value = metadata.get(key)
    if value is None:
        raise ValueError(f"{source}: no {key}; a byte-level BPE vocabulary cannot be built without it")
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{source}: {key} is a {type(value).__name__}, expected a list")
    return list(value)


def _merge_pairs(merges: list[Any], source: str) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs from "left right" strings (llama.cpp splits at the first space
    after the first character) or from pairs."""
    if all(isinstance(merge, str) and merge[:1] not in ("", " ") for merge in merges):
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]  # the common case, fast
        if all(len(pair) == 2 for pair in pairs):
            return pairs
    pairs = []
    for index, merge in enumerate(merges):
        if isinstance(merge, str):
            cut = merge.find(" ", 1)
            if cut < 0:
                raise ValueError(f"{source}: {KEY}merges[{index}] = {merge!r} has no space between its two parts")
            pairs.append((merge[:cut], merge[cut + 1 :]))
        elif isinstance(merge, Sequence) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
            pairs.append((merge[0], merge[1]))
        else:
            raise ValueError(f"{source}: {KEY}merges[{index}] = {merge!r} is neither 'a b' nor a pair of strings")
    return pairs


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> GGUFVocab:
    """The tokenizer a GGUF file describes, built from its metadata (key -> plain Python value).

    This is how a GGUF checkpoint gets its tokenizer without a `tokenizer.json` beside it; `source`
    (the file's path) is named in every error. Token ids equal those of the model's original
    tokenizer; see the module docstring for the few places that differ from transformers.
    """
    model_key, pre_key = KEY + "model", KEY + "pre"
    model = metadata.get(model_key)
    if model == "llama":
        raise ValueError(
            f"{source}: {model_key} = 'llama' (a SentencePiece vocabulary) is not supported; only "
            f"byte-level BPE ('gpt2') is rebuilt from GGUF metadata. Load the model's tokenizer.json instead."
        )
    if model != "gpt2":
        raise ValueError(f"{source}: {model_key} = {model!r} is not supported (supported: 'gpt2', byte-level BPE)")
    pre = metadata.get(pre_key)
    entry = _pre_entry(pre) if isinstance(pre, str) else None
    if entry is None:
        reason = "is missing" if pre is None else f"= {pre!r} is not supported"
        raise ValueError(
            f"{source}: {pre_key} {reason}; without the pre-tokenizer the merges split text differently "
            f"than in training (supported: {', '.join(SUPPORTED_PRE)})"
        )

    tokens = _string_list(metadata, "tokens", source)
    if not all(isinstance(token, str) for token in tokens):
        raise ValueError(f"{source}: {KEY}tokens holds non-string entries")
    merges = _merge_pairs(_string_list(metadata, "merges", source), source)
    types_key = KEY + "token_type"
    types = metadata.get(types_key)
    if types is None:
        types = [NORMAL] * len(tokens)
    elif len(types) != len(tokens):
        raise ValueError(f"{source}: {types_key} has {len(types)} entries but {KEY}tokens has {len(tokens)}")

    # A vocabulary token is spelled in the byte-level alphabet; llama.cpp stores added tokens as
    # their text instead, which is how they are matched and how their text must map to their id
    # for `add_tokens`. Any other token is spelled from its UTF-8 bytes, as transformers does.
    added = [
        AddedToken(tokens[index], special=kind == CONTROL, normalized=False)
        for index, kind in enumerate(types)
        if kind in (CONTROL, USER_DEFINED) and tokens[index]  # an empty token can match no text
    ]
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    if alphabet.issuperset("".join(tokens)):
        vocab = {token: index for index, token in enumerate(tokens)}
    else:
        vocab = {}
        for index, (token, kind) in enumerate(zip(tokens, types)):
            if kind not in (CONTROL, USER_DEFINED) and not alphabet.issuperset(token):
                token = "".join(spelling[b] for b in token.encode("utf-8"))
            vocab[token] = index

    # tokenizers panics (a BaseException) on some merges outside the vocabulary; check first.
    for index, (left, right) in enumerate(merges):
        if left not in vocab or right not in vocab or left + right not in vocab:
            missing = next(part for part in (left, right, left + right) if part not in vocab)
            raise ValueError(f"{source}: {KEY}merges[{index}] = '{left} {right}' needs {missing!r}, not in {KEY}tokens")
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=entry.ignore_merges)
    tokenizer = tokenizers.Tokenizer(bpe)
    if entry.normalizer is not None:
        tokenizer.normalizer = entry.normalizer()
    tokenizer.pre_tokenizer = entry.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    if added:
        tokenizer.add_tokens(added)

    n = len(tokens)
    eos = _special_id(metadata, "eos_token_id", n, source)
    if eos is None:
        raise ValueError(f"{source}: no {KEY}eos_token_id; generation could not tell where a reply ends")
    eos_ids = [eos]
    for field in ("eot_token_id", "eom_token_id"):
        extra = _special_id(metadata, field, n, source)
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{source}: tokenizer.chat_template is a {type(template).__name__}, expected a string")
    return GGUFVocab(
        tokenizer=tokenizer,
        bos_id=_special_id(metadata, "bos_token_id", n, source),
        eos_id=eos,
        eos_ids=tuple(eos_ids),
        pad_id=_special_id(metadata, "padding_token_id", n, source),
        unk_id=_special_id(metadata, "unknown_token_id", n, source),
        add_bos=_flag(metadata, "add_bos_token", entry.add_bos, source),
        add_eos=_flag(metadata, "add_eos_token", False, source),
        chat_template=template,
        pre=entry.name,
    )


def _state(component: Any) -> Any:
    """A tokenizers component as its JSON value, without fields that only move offsets."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            value = {k: clean(v) for k, v in value.items() if k != "trim_offsets"}
            if value.get("type") == "ByteLevel":
                value.setdefault("use_regex", True)  # older tokenizer.json files omit the default
            return value
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return None if component is None else clean(json.loads(component.__getstate__()))


def _recognize(tokenizer: tokenizers.Tokenizer) -> PreTokenizer:
    """The table entry whose normalizer and pre-tokenizer equal `tokenizer`'s, else an error.

    A GGUF can only name a pre-tokenizer, so one that no name stands for cannot be exported
    faithfully.
    """
    normalizer, pre = _state(tokenizer.normalizer), _state(tokenizer.pre_tokenizer)
    for entry in PRE_TOKENIZERS:
        expected_normalizer = None if entry.normalizer is None else _state(entry.normalizer())
        if _state(entry.pre_tokenizer()) == pre and expected_normalizer == normalizer:
            return entry
    raise ValueError(
        "the tokenizer's normalizer/pre-tokenizer match no tokenizer.ggml.pre name this exporter knows "
        f"(supported: {', '.join(entry.name for entry in PRE_TOKENIZERS)}); normalizer = "
        f"{json.dumps(normalizer)}, pre_tokenizer = {json.dumps(pre)[:400]}"
    )


def vocab_from_tokenizer(
    tokenizer: tokenizers.Tokenizer,
    *,
    bos_id: int | None,
    eos_id: int,
    eos_ids: Sequence[int] = (),
    pad_id: int | None = None,
    add_bos: bool,
    add_eos: bool = False,
    chat_template: str | None = None,
) -> GGUFVocab:
    """A `GGUFVocab` for a Hugging Face tokenizer, checked to be exportable to GGUF as it is.

    The export path (a Hugging Face folder's tokenizer.json -> GGUF) uses this: it works out the
    `tokenizer.ggml.pre` name from the pre-tokenizer and refuses what a GGUF cannot express
    (another model type, an unknown pre-tokenizer, added-token stripping), because a file that
    read back differently would shift every token id the model sees.
    """
    model = _state(tokenizer.model)
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers export to GGUF; this model is {model.get('type')!r}")
    entry = _recognize(tokenizer)
    decoder = _state(tokenizer.decoder)
    if (decoder or {}).get("type") != "ByteLevel":  # its options change nothing when decoding
        raise ValueError(f"the tokenizer's decoder is {decoder!r}; byte-level BPE needs ByteLevel")
    for field in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(field):
            raise ValueError(f"the BPE model sets {field} = {model[field]!r}, which GGUF cannot record")
    if model.get("byte_fallback"):
        raise ValueError("the BPE model sets byte_fallback, which byte-level GGUF vocabularies do not use")
    if bool(model.get("ignore_merges")) != entry.ignore_merges:
        raise ValueError(
            f"the BPE model has ignore_merges = {bool(model.get('ignore_merges'))}, but readers of "
            f"tokenizer.ggml.pre = {entry.name!r} apply {entry.ignore_merges}, so the file would tokenize differently"
        )
    for index, token in tokenizer.get_added_tokens_decoder().items():
        if token.lstrip or token.rstrip or token.single_word:
            raise ValueError(
                f"added token {token.content!r} (id {index}) strips spaces or matches single words, "
                "which a GGUF cannot record"
            )
    size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def check(name: str, value: int | None) -> None:
        if value is not None and not 0 <= value < size:
            raise ValueError(f"{name} = {value} is not a token id of the {size}-token vocabulary")

    ends = list(dict.fromkeys([eos_id, *eos_ids]))
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        check(name, value)
    for value in ends:
        check("eos_ids", value)
    if len(ends) > 3:
        raise ValueError(f"eos_ids = {ends}: {TOO_MANY_EOS}")
    unk = model.get("unk_token")
    return GGUFVocab(
        tokenizer=tokenizer,
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=tuple(ends),
        pad_id=pad_id,
        unk_id=None if unk is None else tokenizer.token_to_id(unk),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=chat_template,
        pre=entry.name,
    )


def write_tokenizer_fields(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """Add the tokenizer fields llama.cpp reads to `writer`, so the file reads back identically.

    Vocabulary tokens keep their byte-level spelling, added tokens are stored as their text and
    marked control (special) or user-defined, and ids no token occupies become `[PAD<id>]` unused
    entries, as llama.cpp's own converter writes them.
    """
    extra = [i for i in vocab.eos_ids if i != vocab.eos_id]
    if len(extra) > 2:  # checked before anything is written
        raise ValueError(f"eos_ids = {list(vocab.eos_ids)}: {TOO_MANY_EOS}")
    tokenizer = vocab.tokenizer
    model = _state(tokenizer.model)
    added = tokenizer.get_added_tokens_decoder()
    by_id = {index: token for token, index in model["vocab"].items()}
    size = max([*by_id, *added]) + 1
    tokens, types = [], []
    for index in range(size):
        if index in added:
            tokens.append(added[index].content)
            types.append(CONTROL if added[index].special else USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append(f"{left} {right}")

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    if extra:
        writer.add_eot_token_id(extra[0])
    if len(extra) > 1:
        writer.add_eom_token_id(extra[1])
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)

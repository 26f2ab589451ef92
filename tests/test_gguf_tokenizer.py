"""GGUF tokenizer fields <-> Hugging Face tokenizers: ids equal the original tokenizer's.

Each supported `tokenizer.ggml.pre` gets a tiny byte-level BPE trained here with the pipeline its
model's own tokenizer.json spells out (written literally below, not taken from the module, so a
wrong table entry fails), exported to a real GGUF file, read back and compared on tricky text.
"""

import dataclasses
import json
import os
import time

import gguf
import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from ptjax.interop.gguf_tokenizer import GGUFVocab, tokenizer_from_gguf, vocab_from_tokenizer, write_tokenizer_fields

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_tokens.json")

# The split patterns as Llama 3's and Qwen2's tokenizer.json files hold them.
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "In 2024 we shipped 12345 units, up from 9876 in 2023; 100000 more by 2025.",
    "Don't panic. I'm sure they'll say it's fine, you've heard we'd go. DON'T SHOUT, I'M HERE.",
    "def main():\n    for i in range(10):\n        print(f'{i:03d}')\n\treturn None\n",
    "    indented   code  with   runs     of spaces\n\n\n  and blank lines\r\n",
    "naïve café résumé über straße 日本語のテキスト 中文",
    "العربية Ελληνικά русский",
    "emoji 🎉🚀 and symbols → ≤ ≥ © ™ ½ 1½ ²³ ٣٤٥",
    "x = [1, 22, 333, 4444]; y = {'a': 1.5e-3, 'b': -42}  # comment",
    "The the THE tHe the cat sat on the mat, the dog sat on the log.",
    "hello world hello world helloworld hello, world! hello... world?!",
    "phone 555-0123 date 2024-01-31 time 12:34:56 version v1.2.3 ip 10.0.0.1",
]

STRINGS = [
    "12345",
    "a  1",
    "x   123456 7",
    "year 2024, 1000000 units",
    "  multiple   spaces  ",
    "don't",
    "DON'T I'M we'd You'LL",
    "naïve café 日本語",
    "cafe\u0301 re\u0301sume\u0301",  # decomposed accents: only an NFC pipeline joins them
    "\n\n\tcode()\r\n  x",
    "emoji 🎉🚀👩‍💻 mix",
    "hello world helloworld",
    "print(f'{i:03d}')",
    "",
    " ",
    "trailing space ",
]


def _with_specials(specials: list[str]) -> list[str]:
    """Test strings plus ones with the special tokens embedded in text."""
    a, b = specials[0], specials[-1]
    return STRINGS + [f"{a}user\nhello{b}\n", f"x{a}{b}y", f"{b} 12{a}  don't"]


def _train(normalizer, pre_tokenizer, specials_first, specials_after=(), user_defined=(), ignore_merges=False,
           decoder=None):
    """A small byte-level BPE trained with one model family's pipeline (as its tokenizer.json has it)."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder or decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        special_tokens=list(specials_first),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    # Llama 3 style: special tokens after the BPE vocabulary, absent from the model's vocab.
    if specials_after:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials_after])
    if user_defined:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return tok


FAMILIES = {
    "smollm": dict(
        tokenizer=lambda: _train(
            None,
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            ),
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        ),
        specials=["<|im_start|>", "<|im_end|>"],
        ids=dict(bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", extra=()),
        add_bos=False,
    ),
    "llama-bpe": dict(
        tokenizer=lambda: _train(
            None,
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
                ]
            ),
            [],
            specials_after=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|eom_id|>"],
            ignore_merges=True,
        ),
        specials=["<|start_header_id|>", "<|eot_id|>"],
        ids=dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, extra=("<|eot_id|>", "<|eom_id|>")),
        add_bos=True,
    ),
    "qwen2": dict(
        tokenizer=lambda: _train(
            normalizers.NFC(),
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
                ]
            ),
            [],
            specials_after=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            user_defined=["<think>", "</think>"],
            decoder=decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),  # as Qwen2's
        ),
        specials=["<|im_start|>", "<think>", "<|im_end|>"],
        ids=dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=("<|endoftext|>",)),
        add_bos=False,
    ),
    "gpt-2": dict(
        tokenizer=lambda: _train(
            None, pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"]
        ),
        specials=["<|endoftext|>"],
        ids=dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, extra=()),
        add_bos=False,
    ),
}


def _write_gguf(path, vocab: GGUFVocab) -> dict:
    """Write `vocab` into a real GGUF file (with a dummy tensor) and read its metadata back."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    write_tokenizer_fields(writer, vocab)
    writer.add_tensor("dummy", np.zeros((4,), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {key: field.contents() for key, field in gguf.GGUFReader(str(path)).fields.items()}


def _vocab_of(name):
    family = FAMILIES[name]
    original = family["tokenizer"]()
    tid = lambda t: None if t is None else original.token_to_id(t)  # noqa: E731
    ids = family["ids"]
    vocab = vocab_from_tokenizer(
        original,
        bos_id=tid(ids["bos"]),
        eos_id=tid(ids["eos"]),
        eos_ids=[tid(t) for t in ids["extra"]],
        pad_id=tid(ids["pad"]),
        add_bos=family["add_bos"],
        chat_template="{{ messages }}",
    )
    return original, vocab


@pytest.fixture(scope="module")
def gpt2_metadata(tmp_path_factory):
    """A valid GGUF tokenizer metadata dict, for the refusal tests to break one field at a time."""
    _, vocab = _vocab_of("gpt-2")
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "gpt2.gguf", vocab)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ids_equal_the_original_tokenizer_after_a_gguf_round_trip(name, tmp_path):
    original, vocab = _vocab_of(name)
    assert vocab.pre == name
    metadata = _write_gguf(tmp_path / "t.gguf", vocab)
    assert metadata["tokenizer.ggml.pre"] == name
    rebuilt = tokenizer_from_gguf(metadata, str(tmp_path / "t.gguf"))

    for field in ("bos_id", "eos_id", "eos_ids", "pad_id", "unk_id", "add_bos", "add_eos", "chat_template", "pre"):
        assert getattr(rebuilt, field) == getattr(vocab, field), field
    assert rebuilt.tokenizer.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)

    specials = FAMILIES[name]["specials"]
    for text in _with_specials(specials):
        want = original.encode(text, add_special_tokens=False).ids
        got = rebuilt.tokenizer.encode(text, add_special_tokens=False).ids
        assert got == want, (name, text)
        text_back = rebuilt.tokenizer.decode(got, skip_special_tokens=False)
        assert text_back == original.decode(want, skip_special_tokens=False)
        if name != "qwen2":  # NFC changes decomposed text by design
            assert text_back == text
    for special in specials:  # one id each, as in the original
        assert rebuilt.tokenizer.encode(special, add_special_tokens=False).ids == [original.token_to_id(special)]


def test_special_tokens_are_special_and_user_defined_are_not(tmp_path):
    _, vocab = _vocab_of("qwen2")
    metadata = _write_gguf(tmp_path / "q.gguf", vocab)
    types = dict(zip(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]))
    assert (types["<|im_start|>"], types["<think>"], types["Ġ"]) == (3, 4, 1)
    tok = tokenizer_from_gguf(metadata, "q.gguf").tokenizer
    ids = tok.encode("<|im_start|><think>hi</think><|im_end|>", add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hi</think>"


def test_llama_bpe_takes_whole_pre_tokens_and_gpt2_follows_merges():
    # "abc" is a token no merge sequence reaches: merges make "bc" first and there is no "a"+"bc".
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "c", "bc", "abc"],
        "tokenizer.ggml.merges": ["b c"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    ids = {
        pre: tokenizer_from_gguf({**metadata, "tokenizer.ggml.pre": pre}, "m.gguf").tokenizer.encode("abc").ids
        for pre in ("llama-bpe", "gpt-2", "smollm", "qwen2")
    }
    assert ids == {"llama-bpe": [4], "gpt-2": [0, 3], "smollm": [0, 3], "qwen2": [0, 3]}


def test_raw_vocabulary_tokens_are_spelled_byte_level():
    # A converter that stored "日" raw instead of its byte-level spelling "æĹ¥": transformers spells it.
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["æ", "Ĺ", "¥", "æĹ", "日", "x"],
        "tokenizer.ggml.merges": ["æ Ĺ", "æĹ ¥"],
        "tokenizer.ggml.eos_token_id": 5,
    }
    tok = tokenizer_from_gguf(metadata, "m.gguf").tokenizer
    assert tok.encode("日").ids == [4]
    assert tok.decode([4]) == "日"


def test_ids_no_token_holds_are_written_unused_and_stay_empty(tmp_path):
    original = FAMILIES["gpt-2"]["tokenizer"]()
    state = json.loads(original.to_str())
    gap = max(original.get_vocab(with_added_tokens=True).values()) + 3
    # A vocabulary with a gap below its last id (an added token's id past the model's ids is kept only
    # when the model's vocabulary has it too).
    state["model"]["vocab"]["<|late|>"] = gap
    state["added_tokens"].append(
        dict(id=gap, content="<|late|>", single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    )
    original = tokenizers.Tokenizer.from_str(json.dumps(state))
    eos = original.token_to_id("<|endoftext|>")
    metadata = _write_gguf(tmp_path / "g.gguf", vocab_from_tokenizer(original, bos_id=None, eos_id=eos, add_bos=False))
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    assert len(tokens) == gap + 1
    assert (tokens[gap - 1], types[gap - 1], tokens[gap], types[gap]) == (f"[PAD{gap - 1}]", 5, "<|late|>", 3)
    rebuilt = tokenizer_from_gguf(metadata, "g.gguf").tokenizer
    assert rebuilt.encode("a<|late|>", add_special_tokens=False).ids == original.encode("a<|late|>").ids
    assert rebuilt.encode(f"[PAD{gap - 1}]").ids == original.encode(f"[PAD{gap - 1}]").ids


def test_defaults_follow_llama_cpp():
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<|eot|>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3],
        "tokenizer.ggml.merges": [["a", "b"]],  # pairs are accepted too
        "tokenizer.ggml.eos_token_id": 3,
        "tokenizer.ggml.eot_token_id": 3,
    }
    smol = tokenizer_from_gguf({**metadata, "tokenizer.ggml.pre": "smollm"}, "m.gguf")
    llama = tokenizer_from_gguf({**metadata, "tokenizer.ggml.pre": "llama3"}, "m.gguf")
    assert (smol.add_bos, smol.add_eos, smol.bos_id, smol.eos_ids) == (False, False, None, (3,))
    assert smol.chat_template is None
    assert (llama.add_bos, llama.pre) == (True, "llama-bpe")  # llama.cpp's default for Llama 3, canonical name
    assert smol.tokenizer.encode("ab<|eot|>").ids == [2, 3]


def test_built_tokenizers_do_not_share_components():
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "Ġ", "Ġa"],
        "tokenizer.ggml.merges": ["Ġ a"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    first = tokenizer_from_gguf(metadata, "m.gguf").tokenizer
    first.pre_tokenizer.add_prefix_space = True
    assert first.encode("a").ids == [2]
    assert tokenizer_from_gguf(metadata, "m.gguf").tokenizer.encode("a").ids == [0]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"tokenizer.ggml.pre": "falcon"}, ["tokenizer.ggml.pre", "'falcon'", "smollm", "llama-bpe", "qwen2"]),
        ({"tokenizer.ggml.pre": None}, ["tokenizer.ggml.pre", "missing"]),
        ({"tokenizer.ggml.model": "llama"}, ["tokenizer.ggml.model", "SentencePiece"]),
        ({"tokenizer.ggml.model": "bert"}, ["tokenizer.ggml.model", "'bert'"]),
        ({"tokenizer.ggml.merges": None}, ["tokenizer.ggml.merges"]),
        ({"tokenizer.ggml.tokens": None}, ["tokenizer.ggml.tokens"]),
        ({"tokenizer.ggml.merges": ["Ġt"]}, ["tokenizer.ggml.merges[0]"]),
        ({"tokenizer.ggml.merges": ["Ġ zzzz"]}, ["tokenizer.ggml.merges[0]", "zzzz"]),
        ({"tokenizer.ggml.merges": ["~ ~"]}, ["tokenizer.ggml.merges[0]", "~~"]),
        ({"tokenizer.ggml.token_type": [1, 1]}, ["tokenizer.ggml.token_type", "2 entries"]),
        ({"tokenizer.ggml.eos_token_id": 10**6}, ["tokenizer.ggml.eos_token_id", "1000000"]),
        ({"tokenizer.ggml.bos_token_id": -1}, ["tokenizer.ggml.bos_token_id"]),
        ({"tokenizer.ggml.eos_token_id": None}, ["tokenizer.ggml.eos_token_id"]),
        ({"tokenizer.ggml.eot_token_id": 10**6}, ["tokenizer.ggml.eot_token_id"]),
    ],
)
def test_refusals_name_the_field(gpt2_metadata, change, words):
    metadata = {k: v for k, v in {**gpt2_metadata, **change}.items() if v is not None}
    with pytest.raises(ValueError) as error:
        tokenizer_from_gguf(metadata, "/models/x.gguf")
    message = str(error.value)
    assert message.startswith("/models/x.gguf: ")
    for word in words:
        assert word in message


def test_special_ids_just_past_the_vocabulary_are_refused(gpt2_metadata):
    size = len(gpt2_metadata["tokenizer.ggml.tokens"])
    tokenizer_from_gguf({**gpt2_metadata, "tokenizer.ggml.padding_token_id": size - 1}, "x.gguf")
    with pytest.raises(ValueError, match="tokenizer.ggml.padding_token_id"):
        tokenizer_from_gguf({**gpt2_metadata, "tokenizer.ggml.padding_token_id": size}, "x.gguf")


def test_export_refuses_what_gguf_cannot_express(tmp_path):
    original = FAMILIES["gpt-2"]["tokenizer"]()
    eos = original.token_to_id("<|endoftext|>")
    other = tokenizers.Tokenizer.from_str(original.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="tokenizer.ggml.pre"):
        vocab_from_tokenizer(other, bos_id=None, eos_id=eos, add_bos=False)
    # A Llama 3 split without ignore_merges would read back with it.
    state = json.loads(original.to_str())
    state["pre_tokenizer"] = json.loads(FAMILIES["llama-bpe"]["tokenizer"]().to_str())["pre_tokenizer"]
    with pytest.raises(ValueError, match="ignore_merges"):
        vocab_from_tokenizer(tokenizers.Tokenizer.from_str(json.dumps(state)), bos_id=None, eos_id=eos, add_bos=False)
    # Qwen2's split without its NFC normalizer would read back with it.
    qwen = FAMILIES["qwen2"]["tokenizer"]()
    qwen.normalizer = None
    with pytest.raises(ValueError, match="tokenizer.ggml.pre"):
        vocab_from_tokenizer(qwen, bos_id=None, eos_id=qwen.token_to_id("<|im_end|>"), add_bos=False)
    others = [i for i in range(1, 10) if i != eos]
    vocab_from_tokenizer(original, bos_id=None, eos_id=eos, eos_ids=others[:2], add_bos=False)
    with pytest.raises(ValueError, match="eos_ids"):  # eot and eom: at most two besides EOS
        vocab_from_tokenizer(original, bos_id=None, eos_id=eos, eos_ids=others[:3], add_bos=False)
    vocab = vocab_from_tokenizer(original, bos_id=None, eos_id=eos, eos_ids=others[:2], add_bos=False)
    writer = gguf.GGUFWriter(str(tmp_path / "eos.gguf"), "llama")
    with pytest.raises(ValueError, match="eos_ids"):  # a vocabulary built by hand is checked too
        write_tokenizer_fields(writer, dataclasses.replace(vocab, eos_ids=(eos, *others[:3])))
    with pytest.raises(ValueError, match="pad_id"):
        vocab_from_tokenizer(original, bos_id=None, eos_id=eos, pad_id=10**6, add_bos=False)
    for flag in ("lstrip", "rstrip", "single_word"):
        stripped = tokenizers.Tokenizer.from_str(original.to_str())
        stripped.add_special_tokens([AddedToken("<mask>", special=True, **{flag: True})])
        with pytest.raises(ValueError, match="<mask>"):
            vocab_from_tokenizer(stripped, bos_id=None, eos_id=eos, add_bos=False)
    other = tokenizers.Tokenizer.from_str(original.to_str())
    other.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="decoder"):
        vocab_from_tokenizer(other, bos_id=None, eos_id=eos, add_bos=False)
    wordpiece = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="byte-level BPE"):
        vocab_from_tokenizer(wordpiece, bos_id=None, eos_id=0, add_bos=False)


@pytest.mark.skipif(not os.environ.get("PTJAX_SMOLLM2_GGUF"), reason="set PTJAX_SMOLLM2_GGUF to the SmolLM2 GGUF file")
def test_smollm2_gguf_matches_the_recorded_ids():
    path = os.environ["PTJAX_SMOLLM2_GGUF"]
    reader = gguf.GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    start = time.perf_counter()
    vocab = tokenizer_from_gguf(metadata, path)
    seconds = time.perf_counter() - start
    with open(FIXTURE, encoding="utf-8") as f:
        fixture = json.load(f)
    for case in fixture["cases"]:
        assert vocab.tokenizer.encode(case["text"], add_special_tokens=False).ids == case["ids"], case["text"]
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.add_bos) == (1, 2, 2, 0, False)
    assert vocab.chat_template.startswith("{% for message in messages %}")
    print(f"SmolLM2 tokenizer built from GGUF metadata in {seconds:.3f} s")
    assert seconds < 2.0

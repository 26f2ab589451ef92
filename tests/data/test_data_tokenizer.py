import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ptjax.data import ByteTokenizer, HFTokenizer, load_tokenizer

SENTENCES = ["the cat sat on the mat", "a dog sat on a log", "the dog saw the cat"]
TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"


def _word_level_tokenizer(special_tokens):
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(special_tokens) + ["<unk>"])
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return tok


def _byte_level_bpe(special_tokens):
    """A small GPT-2-style BPE whose ByteLevel post-processor trims offsets (as GPT-2's does)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES + ["Answer: yes", "yes yes"] * 5, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return tok


def _write(folder, name, value):
    (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))


@pytest.mark.parametrize("text", ["hello", "héllo wörld ✓", "日本語\n\ttabs", ""])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_specials_and_out_of_range_ids_are_skipped():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert (tok.stop_ids, tok.add_bos, tok.chat_template) == ((2,), True, None)
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.decode([1, ord("H") + 3, 2, 0, 300, ord("i") + 3]) == "Hi"
    # A multi-byte character cut in half decodes to the replacement character, not an exception.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_byte_offsets_are_character_spans():
    ids, offsets = ByteTokenizer().encode_with_offsets("aé✓")
    assert ids == ByteTokenizer().encode("aé✓")
    assert offsets == [(0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3)]


@pytest.mark.parametrize("name", [None, "", "byte"])
def test_load_tokenizer_byte(name):
    assert isinstance(load_tokenizer(name), ByteTokenizer)


@pytest.mark.parametrize("by_folder", [True, False])
def test_hf_tokenizer_from_tokenizer_json(tmp_path, by_folder):
    raw = _word_level_tokenizer(["<pad>", "<s>", "</s>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path if by_folder else tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.pad_id == raw.token_to_id("<pad>") == 0
    assert tok.bos_id == raw.token_to_id("<s>") == 1
    assert tok.eos_id == raw.token_to_id("</s>") == 2
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.stop_ids == (2,) and tok.chat_template is None
    assert not tok.add_bos  # no post-processor puts "<s>" in front
    ids = tok.encode("the dog sat")
    assert ids == [raw.token_to_id(w) for w in ("the", "dog", "sat")]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "the dog sat"


def test_hf_tokenizer_reads_config_and_pads_with_eos(tmp_path):
    raw = _word_level_tokenizer(["<|begin|>", "<|end|>", "</s>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    # Without a config, the conventional "</s>" is taken as EOS and there is no BOS or PAD.
    guessed = HFTokenizer.from_folder(tmp_path)
    assert guessed.eos_id == guessed.bos_id == guessed.pad_id == raw.token_to_id("</s>")
    assert not guessed.add_bos and guessed.bos_token == ""
    _write(tmp_path, "tokenizer_config.json",
           {"eos_token": {"content": "<|end|>", "lstrip": False}})
    _write(tmp_path, "special_tokens_map.json", {"bos_token": "<|begin|>", "eos_token": "</s>"})
    tok = HFTokenizer.from_folder(tmp_path)
    assert tok.bos_id == raw.token_to_id("<|begin|>")
    assert tok.eos_id == raw.token_to_id("<|end|>")  # tokenizer_config.json wins
    assert (tok.bos_token, tok.eos_token) == ("<|begin|>", "<|end|>")
    assert tok.pad_id == tok.eos_id


def test_hf_tokenizer_without_eos_is_an_error(tmp_path):
    _word_level_tokenizer(["<pad>"]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*end-of-sequence"):
        HFTokenizer.from_folder(tmp_path / "tokenizer.json")


def test_hf_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_hf_constructor_from_parts():
    raw = _word_level_tokenizer(["<s>", "</s>", "<|eot|>"])
    s, end, eot = (raw.token_to_id(t) for t in ("<s>", "</s>", "<|eot|>"))
    tok = HFTokenizer(raw, eos_id=eot, bos_id=s, eos_ids=[end, eot, end], chat_template=TEMPLATE,
                      add_bos=True, source="model.gguf")
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.add_bos) == (eot, s, eot, True)
    assert tok.stop_ids == (eot, end)  # eos_id first, duplicates dropped
    assert (tok.chat_template, tok.source, tok.bos_token) == (TEMPLATE, "model.gguf", "<s>")
    # Without a BOS token, bos_id is a filler (EOS) that no sequence starts with.
    no_bos = HFTokenizer(raw, eos_id=end, add_bos=True)
    assert (no_bos.bos_id, no_bos.add_bos, no_bos.bos_token) == (end, False, "")
    assert no_bos.stop_ids == (end,)
    with pytest.raises(ValueError, match=r"model\.gguf: eos_ids\[1\]=999 is not a token id"):
        HFTokenizer(raw, eos_id=end, eos_ids=[eot, 999], source="model.gguf")
    # Ids read from binary metadata may be NumPy integers; they are stored as Python ints.
    from_numpy = HFTokenizer(raw, eos_id=np.int32(end), eos_ids=[np.uint32(eot)])
    assert from_numpy.stop_ids == (end, eot) and type(from_numpy.eos_id) is int


def test_add_bos_follows_config_else_post_processor(tmp_path):
    raw = _byte_level_bpe(["<|begin_of_text|>", "<|eot_id|>"])
    bos = raw.token_to_id("<|begin_of_text|>")
    raw.save(str(tmp_path / "tokenizer.json"))
    assert not HFTokenizer.from_folder(tmp_path).add_bos  # a ByteLevel post-processor adds nothing
    raw.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_folder(tmp_path)  # Llama 3 style: the post-processor prepends BOS
    assert tok.add_bos and tok.bos_id == bos
    _write(tmp_path, "tokenizer_config.json", {"add_bos_token": False})
    assert not HFTokenizer.from_folder(tmp_path).add_bos
    # An explicit null BOS (Qwen2) means none, even though "<|begin_of_text|>" is in the vocabulary.
    _write(tmp_path, "tokenizer_config.json", {"bos_token": None, "eos_token": "<|eot_id|>"})
    tok = HFTokenizer.from_folder(tmp_path)
    assert not tok.add_bos and tok.bos_id == tok.eos_id == raw.token_to_id("<|eot_id|>")


def test_generation_config_eos_ids_become_stop_ids(tmp_path):
    raw = _word_level_tokenizer(["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    end, eot, eom = (raw.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
    _write(tmp_path, "tokenizer_config.json", {"eos_token": "<|eot_id|>"})
    _write(tmp_path, "generation_config.json", {"eos_token_id": [end, eom, eot]})
    assert HFTokenizer.from_folder(tmp_path).stop_ids == (eot, end, eom)
    _write(tmp_path, "generation_config.json", {"eos_token_id": end})
    assert HFTokenizer.from_folder(tmp_path).stop_ids == (eot, end)
    _write(tmp_path, "generation_config.json", {"eos_token_id": "eot"})
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id"):
        HFTokenizer.from_folder(tmp_path)
    _write(tmp_path, "generation_config.json", "{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json: not valid JSON"):
        HFTokenizer.from_folder(tmp_path)


def test_chat_template_sources(tmp_path):
    _word_level_tokenizer(["</s>"]).save(str(tmp_path / "tokenizer.json"))
    _write(tmp_path, "tokenizer_config.json", {"chat_template": TEMPLATE})
    assert HFTokenizer.from_folder(tmp_path).chat_template == TEMPLATE
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    _write(tmp_path, "tokenizer_config.json", {"chat_template": named})
    assert HFTokenizer.from_folder(tmp_path).chat_template == "plain"
    _write(tmp_path, "tokenizer_config.json", {"chat_template": named[:1]})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: .*\['tool_use'\].*'default'"):
        HFTokenizer.from_folder(tmp_path)
    # chat_template.jinja (written by newer transformers) wins over the config.
    _write(tmp_path, "chat_template.jinja", "{{ messages | length }}\n")
    assert HFTokenizer.from_folder(tmp_path).chat_template == "{{ messages | length }}\n"


def test_hf_offsets_recognize_special_tokens_and_are_not_trimmed():
    raw = _byte_level_bpe(["<|endoftext|>", "<|im_end|>"])
    tok = HFTokenizer(raw, eos_id=raw.token_to_id("<|im_end|>"))
    text = "Answer: yes<|im_end|>é"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    pieces = [text[a:b] for a, b in offsets]
    assert pieces[:4] == ["Answer", ":", " yes", "<|im_end|>"]  # " yes" keeps its space
    assert ids[3] == tok.eos_id and set(pieces[4:]) == {"é"}
    # The raw tokenizer's post-processor would have trimmed that space; the caller's object is
    # left as it was.
    assert raw.encode(text, add_special_tokens=False).offsets[2] == (8, 11)


def test_train_bpe_learns_words_and_round_trips_any_text(tmp_path):
    from ptjax.data import encode_sft, train_bpe

    texts = [f"Vokari lives in Drammo and works as a weaver, number {i}." for i in range(200)]
    tok = train_bpe(texts, 400, tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))  # what a resumed run reads
    for t in (tok, again):
        assert (t.pad_id, t.bos_id, t.eos_id, t.add_bos) == (0, 1, 2, True)
        assert t.vocab_size <= 400
    assert again.encode("Drammo weaver") == tok.encode("Drammo weaver")
    # frequent words became single tokens that carry their leading space
    assert len(tok.encode(" weaver")) == 1 and len(tok.encode(" Drammo")) == 1
    assert tok.encode("a weaver")[-1] == tok.encode(" weaver")[0]
    # bytes never seen in training still encode, and decode gives the text back
    for text in ("Ünïcødé ✓ 12,345\n\ttabs", "lives in Drammo."):
        assert tok.decode(tok.encode(text)) == text
    ids, mask = encode_sft({"prompt": "Q: where?\nA:", "completion": " Drammo"}, tok, 32)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids[mask]) == " Drammo"
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(texts, 200, tmp_path / "small")

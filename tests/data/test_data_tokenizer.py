import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from ptjax.data import ByteTokenizer, HFTokenizer, load_tokenizer

SENTENCES = ["the cat sat on the mat", "a dog sat on a log", "the dog saw the cat"]


def _word_level_tokenizer(special_tokens):
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(special_tokens) + ["<unk>"])
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return tok


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
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.decode([1, ord("H") + 3, 2, 0, 300, ord("i") + 3]) == "Hi"
    # A multi-byte character cut in half decodes to the replacement character, not an exception.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


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
    ids = tok.encode("the dog sat")
    assert ids == [raw.token_to_id(w) for w in ("the", "dog", "sat")]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "the dog sat"


def test_hf_tokenizer_reads_config_and_pads_with_eos(tmp_path):
    raw = _word_level_tokenizer(["<|begin|>", "<|end|>", "</s>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    # Without a config, the conventional "</s>" is taken as EOS and there is no BOS or PAD.
    guessed = HFTokenizer(tmp_path)
    assert guessed.eos_id == guessed.bos_id == guessed.pad_id == raw.token_to_id("</s>")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|end|>", "lstrip": False}})
    )
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|begin|>", "eos_token": "</s>"})
    )
    tok = HFTokenizer(tmp_path)
    assert tok.bos_id == raw.token_to_id("<|begin|>")
    assert tok.eos_id == raw.token_to_id("<|end|>")  # tokenizer_config.json wins
    assert tok.pad_id == tok.eos_id


def test_hf_tokenizer_without_eos_is_an_error(tmp_path):
    _word_level_tokenizer(["<pad>"]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*end-of-sequence"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_hf_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))

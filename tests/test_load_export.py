"""`ptjax.interop.load` (any checkpoint -> params, its own config, tokenizer, generation defaults)
and `ptjax.interop.export` (a folder transformers takes as is, a GGUF llama.cpp takes)."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest
import tokenizers

from ptjax.data import encode_chat_prompt
from ptjax.interop import export, load
from ptjax.models import llama
from ptjax.models.config import preset
from tiny_checkpoint import CHATML, write_chat_model

TEXTS = ["Hello, world!", "sort 3912 gives 1239", "  spaces\tand\nnewlines ", "naïve café 🙂",
         "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "model"
    params, cfg, tok = write_chat_model(folder)
    return folder, params, cfg, tok


def logits(params, cfg, tokens):
    return np.asarray(jax.jit(llama.forward, static_argnums=1)(params, cfg, tokens))


def test_load_folder_reads_config_tokenizer_and_generation(chat_model):
    folder, params, cfg, tok = chat_model
    model = load.load(str(folder))
    assert model.config == cfg
    chex.assert_trees_all_equal(model.params, params)
    t = model.tokenizer
    assert (t.eos_id, t.bos_id, t.pad_id, t.add_bos) == (2, 1, 0, False)
    assert t.stop_ids == (2, 0) and t.chat_template == CHATML
    assert model.generation["temperature"] == 0.7 and model.generation["top_p"] == 0.9
    assert model.generation["eos_token_id"] == [2, 0]
    for text in TEXTS:
        assert t.encode(text) == tok.encode(text, add_special_tokens=False).ids


def test_load_compute_dtype_override_and_bf16_storage(chat_model):
    folder, params, cfg, _ = chat_model
    model = load.load(str(folder), dtype="bfloat16", remat="full", param_dtype="bfloat16")
    assert model.config == dataclasses.replace(cfg, dtype="bfloat16", remat="full")
    chex.assert_trees_all_equal_dtypes(model.params, jax.tree.map(
        lambda x: x.astype(jax.numpy.bfloat16), params))


def test_export_folder_round_trips(chat_model, tmp_path):
    folder, params, cfg, _ = chat_model
    model = load.load(str(folder))
    out = tmp_path / "export"
    export.save_hf(model.params, model.config, model.tokenizer, str(out), generation=model.generation)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert config["max_position_embeddings"] == 512
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0] and generation["temperature"] == 0.7
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML and tok_config["eos_token"] == "<|im_end|>"
    back = load.load(str(out))
    assert back.config == cfg
    chex.assert_trees_all_equal(back.params, params)
    assert back.tokenizer.stop_ids == (2, 0) and back.tokenizer.add_bos is False
    messages = [("user", "sort 3912"), ("assistant", "1239"), ("user", "12+7")]
    np.testing.assert_array_equal(encode_chat_prompt(messages, back.tokenizer),
                                  encode_chat_prompt(messages, model.tokenizer))
    for text in TEXTS:
        assert back.tokenizer.encode(text) == model.tokenizer.encode(text)


@pytest.mark.parametrize("dtype, atol", [("F32", 0.0), ("F16", 2e-2), ("Q8_0", 8e-2)])
def test_export_gguf_reads_back(chat_model, tmp_path, dtype, atol):
    folder, params, cfg, _ = chat_model
    model = load.load(str(folder))
    path = tmp_path / "model.gguf"
    export.save_gguf(model.params, model.config, model.tokenizer, str(path), dtype=dtype)
    back = load.load(str(path))
    assert dataclasses.replace(back.config, max_position_embeddings=512) == cfg
    tokens = np.asarray([[5, 40, 77, 123, 200, 9]], np.int32)
    want = logits(params, cfg, tokens)
    got = logits(back.params, back.config, tokens)
    if atol == 0.0:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, atol=atol * np.abs(want).max())
        assert not np.array_equal(got, want)  # really stored in lower precision
    t = back.tokenizer
    assert t.chat_template == CHATML and t.eos_id == 2 and t.add_bos is False
    assert 0 in t.stop_ids
    for text in TEXTS:
        assert t.encode(text) == model.tokenizer.encode(text)


def test_run_directory_loads_its_merged_model(chat_model, tmp_path):
    folder, params, cfg, _ = chat_model
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"trainer": "sft", "model": {"init": str(folder)}}))
    with pytest.raises(ValueError, match="without merged/ or adapter/"):
        load.load(str(run))
    model = load.load(str(folder))
    export.save_hf(model.params, model.config, model.tokenizer, str(run / "merged"))
    assert load.kind_of(str(run)) == "run"
    chex.assert_trees_all_equal(load.load(str(run)).params, params)


def test_kind_of_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.bin: not a model"):
        load.kind_of(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="no config.json"):
        load.kind_of(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        load.kind_of(str(tmp_path / "missing"))


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    folder = tmp_path / "m"
    write_chat_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100  # fewer rows than the tokenizer has tokens
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the embedding table only 100"):
        load.load(str(folder))


def test_preset_must_match_the_checkpoint(chat_model):
    _, _, cfg, _ = chat_model
    with pytest.raises(ValueError, match=r"hidden: checkpoint 32, preset 192.*layers: checkpoint 2"):
        load.check_preset(cfg, preset("demo"), "ckpt")
    load.check_preset(cfg, dataclasses.replace(cfg, dtype="bfloat16", remat="full"), "ckpt")


def test_generation_defaults_are_transformers_defaults(tmp_path):
    assert load.read_generation_config(str(tmp_path)) == {
        "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
        "do_sample": False, "max_new_tokens": None}


def test_exported_tokenizer_puts_bos_in_front_exactly_once(tmp_path):
    from ptjax.data import HFTokenizer
    from tiny_checkpoint import bpe_tokenizer

    tok = bpe_tokenizer()  # no post-processor, as a tokenizer built from GGUF metadata
    wants_bos = HFTokenizer(tok, eos_id=2, bos_id=1, add_bos=True)
    export.save_tokenizer(wants_bos, str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 1_000_000 and config["add_bos_token"] is True
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    assert saved.encode("sort", add_special_tokens=True).ids[:2] == [1, *tok.encode("sort").ids[:1]]
    # Saving a tokenizer that already adds BOS must not add a second one.
    export.save_tokenizer(HFTokenizer(saved, eos_id=2, bos_id=1, add_bos=True), str(tmp_path / "b"))
    again = tokenizers.Tokenizer.from_file(str(tmp_path / "b" / "tokenizer.json"))
    assert again.encode("sort", add_special_tokens=True).ids == saved.encode(
        "sort", add_special_tokens=True).ids
    export.save_tokenizer(HFTokenizer(tok, eos_id=2, bos_id=1, add_bos=False), str(tmp_path / "c"))
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "c" / "tokenizer.json"))
    assert plain.encode("sort", add_special_tokens=True).ids == tok.encode("sort").ids


def test_a_byte_tokenizer_model_exported_by_ptjax_loads_back(tmp_path):
    """A folder exported from a model on ptjax's byte tokenizer (no tokenizer.json) loads as
    `model.init` with that tokenizer and the same weights; a folder without tokenizer.json and
    without the mark is still refused."""
    from ptjax.data import load_tokenizer
    from ptjax.data.tokenizer import ByteTokenizer

    cfg = preset("tiny")
    params = jax.device_get(llama.init_params(cfg, jax.random.key(1)))
    folder = str(tmp_path / "byte_model")
    export.save_hf(params, cfg, load_tokenizer("byte"), folder)
    back = load.load(folder)
    assert isinstance(back.tokenizer, ByteTokenizer)
    assert back.tokenizer.encode("hi") == load_tokenizer("byte").encode("hi")
    chex.assert_trees_all_close(back.params, params)
    with open(tmp_path / "byte_model" / "config.json") as f:
        config = json.load(f)
    del config[export.BYTE_TOKENIZER_KEY]
    with open(tmp_path / "byte_model" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load.load(folder)

"""Tiny real-format checkpoints for tests: a byte-level BPE tokenizer trained in a second and a
Hugging Face folder around random weights, laid out exactly as published chat models are."""

from __future__ import annotations

import json

import jax
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ptjax.interop import hf
from ptjax.models import llama
from ptjax.models.config import ModelConfig

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (SmolLM2's layout)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "sort 3912 gives 1239",
          "12+7=19 and 100+23=123", "Hello, world! How are you today?",
          "assistant user system: answer only", "naïve café, 日本語 text and emoji 🙂"] * 20


def bpe_tokenizer(vocab_size: int = 320) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE (SmolLM2's `gpt2` pre-tokenizer family) with ChatML specials."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_config(vocab_size: int, **fields) -> ModelConfig:
    return ModelConfig(**{"vocab_size": vocab_size, "hidden": 32, "mlp": 64, "layers": 2,
                          "heads": 4, "kv_heads": 2, "head_dim": 8, "norm_eps": 1e-5,
                          "tie_embeddings": True, "max_position_embeddings": 512, **fields})


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Numpy params with the model's shapes (traced init only: no per-op compiles)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: llama.init_params(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def write_chat_model(folder, seed: int = 0, generation: dict | None = None, **config_fields):
    """A Hugging Face folder like SmolLM2-Instruct's: config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json (ChatML template, no BOS added), generation_config.json
    (eos list); returns (params, config, tokenizers.Tokenizer)."""
    tok = bpe_tokenizer()
    cfg = tiny_config(tok.get_vocab_size() + 6, **config_fields)  # padded rows, as real models have
    params = random_params(cfg, seed)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_params(params, cfg, str(folder), extra_config={"bos_token_id": 1, "eos_token_id": 2})
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML}))
    (folder / "generation_config.json").write_text(json.dumps(
        generation or {"bos_token_id": 1, "eos_token_id": [2, 0], "temperature": 0.7,
                       "top_p": 0.9, "do_sample": True}))
    return params, cfg, tok

"""Write a model in the formats serving stacks take unchanged: a Hugging Face folder or a GGUF file.

`python -m ptjax.export` is the command line over these writers. The folder holds config.json (with bos/eos/pad
ids and max_position_embeddings), safetensors weights, the tokenizer files (tokenizer.json,
tokenizer_config.json with the chat template) and generation_config.json, so
`AutoModelForCausalLM`, `AutoTokenizer` and a text-generation pipeline work on it as is. The GGUF
file (F16 or Q8_0) carries the tokenizer and chat template, for llama.cpp-based tools.
"""

from __future__ import annotations

import json
import os

import tokenizers

from ptjax.models.config import ModelConfig

# config.json key marking a folder whose model reads ptjax's byte tokenizer (no tokenizer.json).
BYTE_TOKENIZER_KEY = "ptjax_byte_tokenizer"

HF_DTYPES = ("float32", "bfloat16", "float16")
GGUF_DTYPES = ("F32", "F16", "Q8_0")


def _token(tokenizer, token_id):
    return None if token_id is None else tokenizer.tokenizer.id_to_token(int(token_id))


def _with_bos_post_processor(tokenizer) -> tokenizers.Tokenizer:
    """The tokenizer, made to insert BOS itself when the model expects BOS and its tokenizer.json
    does not add one (tokenizers built from GGUF metadata), since transformers reads the post
    processor, not ptjax's `add_bos`."""
    tok = tokenizers.Tokenizer.from_str(tokenizer.tokenizer.to_str())
    if not tokenizer.add_bos or tokenizer.bos_id is None:
        return tok
    if tok.encode("a", add_special_tokens=True).ids[:1] == [tokenizer.bos_id]:
        return tok
    bos = _token(tokenizer, tokenizer.bos_id)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    return tok


def save_tokenizer(tokenizer, folder: str, max_length: int = 0) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template, BOS rule).

    Why: a merged model without its tokenizer cannot be served; and the chat template and stop
    tokens are what make an instruct model answer in turns.
    """
    os.makedirs(folder, exist_ok=True)
    _with_bos_post_processor(tokenizer).save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token or None,
        "eos_token": _token(tokenizer, tokenizer.eos_id),
        "pad_token": _token(tokenizer, tokenizer.pad_id),
        "add_bos_token": bool(tokenizer.add_bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(max_length) if max_length else 1_000_000,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def generation_config(tokenizer, generation: dict | None = None) -> dict:
    """generation_config.json: every stop id, BOS/PAD, and the sampling defaults the model came with."""
    stops = list(getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))
    out = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
           "pad_token_id": tokenizer.pad_id}
    for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        if generation and generation.get(key) is not None:
            out[key] = generation[key]
    return out


def save_hf(params, cfg: ModelConfig, tokenizer, folder: str, *, generation: dict | None = None,
            dtype: str = "float32") -> None:
    """A Hugging Face folder transformers loads unchanged: weights, config with token ids,
    tokenizer files (for a `tokenizers` tokenizer) and generation_config.json."""
    from ptjax.interop import hf

    token_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                 "pad_token_id": tokenizer.pad_id}
    if not hasattr(tokenizer, "tokenizer"):  # the byte tokenizer has no tokenizer.json to write:
        token_ids[BYTE_TOKENIZER_KEY] = True  # the loader reads this mark instead
    hf.save_params(params, cfg, folder, dtype=dtype, extra_config=token_ids)
    if hasattr(tokenizer, "tokenizer"):
        save_tokenizer(tokenizer, folder, cfg.max_position_embeddings)
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(tokenizer, generation), f, indent=2)


def save_gguf(params, cfg: ModelConfig, tokenizer, path: str, *, dtype: str = "Q8_0") -> None:
    """A GGUF file (F32, F16 or Q8_0 matrices) with the tokenizer and chat template, which
    llama.cpp-based tools run and `ptjax.interop.load` reads back."""
    from ptjax.interop import gguf_io, gguf_tokenizer

    if not hasattr(tokenizer, "tokenizer"):
        raise ValueError("GGUF export needs a byte-level BPE tokenizer (tokenizer.json); "
                         "the byte tokenizer has no GGUF form")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vocab = gguf_tokenizer.vocab_from_tokenizer(
        tokenizer.tokenizer, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        eos_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id, add_bos=tokenizer.add_bos,
        chat_template=tokenizer.chat_template)
    gguf_io.save_gguf(params, cfg, path, dtype=dtype,
                      tokenizer_writer=lambda writer: gguf_tokenizer.write_tokenizer_fields(writer, vocab))

"""One loader for every place a model can come from: a Hugging Face folder, a GGUF file, a ptjax run.

`load(path)` returns the weights, the model config *read from the checkpoint itself*, the model's
own tokenizer (with its chat template and stop ids) and its generation defaults. Training
(`model.init`), `python -m ptjax.generate` and the examples all go through it, so a checkpoint is
interpreted one way everywhere.

Everything here treats the files as untrusted: weights come only from safetensors or GGUF (pickles
are refused), no code from the folder is imported, and chat templates render in jinja2's sandbox.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_dtypes
import numpy as np

from ptjax.data.tokenizer import ByteTokenizer, HFTokenizer
from ptjax.models.config import ModelConfig

# The sampling settings a generation_config.json may carry, and what they are when it does not.
GENERATION_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                       "do_sample": False, "max_new_tokens": None}
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class Pretrained:
    """A loaded model: host (numpy) params, its config, tokenizer and generation defaults."""

    params: dict
    config: ModelConfig
    tokenizer: HFTokenizer
    generation: dict
    source: str
    adapter: str = ""  # the PEFT adapter folder applied on top of the base, if any


def kind_of(path: str) -> str:
    """"gguf", "hf" or "run": what `path` holds, decided from its files (never by running them)."""
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise ValueError(f"{path}: not a model: expected a .gguf file, a Hugging Face folder "
                         "(config.json + safetensors) or a ptjax run directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            fields = json.load(f)
        if isinstance(fields, dict) and "trainer" in fields and "model" in fields:
            return "run"
        return "hf"
    raise ValueError(f"{path}: has no config.json (a Hugging Face folder needs one; a ptjax run "
                     "directory has the run's config.json)")


def read_generation_config(folder: str) -> dict:
    """Sampling defaults and stop ids from a folder's generation_config.json (defaults when absent).

    Why: chat models ship their intended decoding (several EOS ids such as `<|eot_id|>` and
    `<|end_of_text|>`, temperature, top-p); generating without them runs past the end of a turn.
    """
    out = dict(GENERATION_DEFAULTS)
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as f:
        fields = json.load(f)
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in GENERATION_DEFAULTS:
        if fields.get(key) is not None:
            out[key] = fields[key]
    eos = fields.get("eos_token_id")
    if eos is not None:
        out["eos_token_id"] = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    for key in ("bos_token_id", "pad_token_id"):
        if fields.get(key) is not None:
            out[key] = int(fields[key])
    return out


def _cast(params: dict, dtype: str) -> dict:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return params
    import jax

    return jax.tree.map(lambda x: x.astype(_DTYPES[dtype]), params)


def _check_vocab(tokenizer: HFTokenizer, cfg: ModelConfig, source: str) -> None:
    """Ids past the embedding table would index garbage (JAX clamps, it does not raise)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"embedding table only {cfg.vocab_size} rows")


def _reads_byte_tokenizer(folder: str) -> bool:
    """True for a folder ptjax exported from a model trained on its byte tokenizer (config.json
    carries `export.BYTE_TOKENIZER_KEY` and there is no tokenizer.json), so a run's export can
    start the next run (`model.init`), as the demo's SFT model starts PPO."""
    from ptjax.interop.export import BYTE_TOKENIZER_KEY

    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return False
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return bool(json.load(f).get(BYTE_TOKENIZER_KEY))


def _load_hf(folder: str, dtype: str, overrides: dict) -> Pretrained:
    from ptjax.interop import hf

    cfg = hf.config_from_hf(folder, **overrides)
    if _reads_byte_tokenizer(folder):
        tokenizer = ByteTokenizer()
    else:
        tokenizer = HFTokenizer.from_folder(folder)
        _check_vocab(tokenizer, cfg, folder)
    params = hf.load_params(folder, cfg)
    generation = read_generation_config(folder)
    return Pretrained(_cast(params, dtype), cfg, tokenizer, generation, folder)


def _load_gguf(path: str, dtype: str, overrides: dict) -> Pretrained:
    from ptjax.interop import gguf_io, gguf_tokenizer

    checkpoint = gguf_io.load(path)
    cfg = dataclasses.replace(checkpoint.config, **overrides)
    vocab = gguf_tokenizer.tokenizer_from_gguf(checkpoint.metadata, path)
    tokenizer = HFTokenizer(vocab.tokenizer, eos_id=vocab.eos_id, bos_id=vocab.bos_id,
                            pad_id=vocab.pad_id, eos_ids=vocab.eos_ids,
                            chat_template=vocab.chat_template, add_bos=vocab.add_bos, source=path)
    _check_vocab(tokenizer, cfg, path)
    generation = {**GENERATION_DEFAULTS, "eos_token_id": list(tokenizer.stop_ids)}
    return Pretrained(_cast(checkpoint.params, dtype), cfg, tokenizer, generation, path)


def _load_run(folder: str, dtype: str, overrides: dict) -> Pretrained:
    """A finished ptjax run: its merged model when it wrote one, else its base + PEFT adapter."""
    merged = os.path.join(folder, "merged")
    if os.path.isdir(merged):
        return _load_hf(merged, dtype, overrides)
    adapter = os.path.join(folder, "adapter")
    if not os.path.isdir(adapter):
        raise ValueError(f"{folder}: a ptjax run directory without merged/ or adapter/ "
                         "(has the run finished?)")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        base = json.load(f)["model"].get("init", "")
    if not base:
        raise ValueError(f"{folder}: the run has an adapter but no base model (model.init)")
    pretrained = load(base, param_dtype=dtype, **overrides)
    return with_adapter(pretrained, adapter)


def with_adapter(pretrained: Pretrained, adapter: str) -> Pretrained:
    """The model with a PEFT adapter folder applied (LoRA/DoRA/IA3 nodes or soft prompts)."""
    from ptjax.interop import peft_format

    params = peft_format.load_adapter(pretrained.params, adapter)
    return dataclasses.replace(pretrained, params=params, adapter=adapter)


def load(path: str, *, param_dtype: str = "float32", adapter: str = "",
         **config_overrides) -> Pretrained:
    """The model at `path` (GGUF file, Hugging Face folder or ptjax run directory), its config read
    from the checkpoint, its tokenizer and generation defaults; `adapter` applies a PEFT folder.

    Why one entry point: the config must come from the checkpoint (RoPE scaling, theta and norm eps
    differ between releases of the same architecture), and every consumer (training, generation,
    export) must read a checkpoint the same way. `config_overrides` set ptjax-only fields such as
    `dtype="bfloat16"` (compute) or `remat="full"`; `param_dtype` is the storage of the returned
    params ("float32" or "bfloat16").
    """
    loaders = {"gguf": _load_gguf, "hf": _load_hf, "run": _load_run}
    pretrained = loaders[kind_of(path)](path, param_dtype, config_overrides)
    return with_adapter(pretrained, adapter) if adapter else pretrained


def check_preset(cfg: ModelConfig, preset_cfg: ModelConfig, source: str) -> None:
    """Refuse a preset that disagrees with the checkpoint, naming every differing field.

    Why: a config file may still name a preset when `model.init` is given; silently preferring
    either side would run a model other than the one the user asked for.
    """
    ignore = {"dtype", "remat", "scan_layers", "max_position_embeddings"}
    diffs = [f"{f.name}: checkpoint {getattr(cfg, f.name)!r}, preset {getattr(preset_cfg, f.name)!r}"
             for f in dataclasses.fields(ModelConfig)
             if f.name not in ignore and getattr(cfg, f.name) != getattr(preset_cfg, f.name)]
    if diffs:
        raise ValueError(f"{source}: model.preset does not match the checkpoint ("
                         + "; ".join(diffs) + "); leave model.preset empty to use the checkpoint's")

"""Hugging Face Llama / Qwen2 checkpoints in and out: `config.json` plus safetensors weights.

One table, `hf_layout(cfg)`, pairs every Hugging Face tensor name with its pytree path and says
whether it is an `nn.Linear` weight (stored [out, in], transposed to ptjax's [in, out]). Loading
and saving both walk that table, so the two directions cannot drift apart.

Loaded parameters are float32 *numpy* arrays: the caller decides where they live
(`jax.device_put(params, shardings)` places each shard once, instead of first landing the whole
model on the default device). Files stored in bfloat16 or float16 are upcast on read.
Checkpoints saved in bitsandbytes' 4-bit format load as `NF4` nodes (`bnb_format`), and NF4
nodes are saved back in it; compressed-tensors checkpoints (int8, int4, fp8 weight-only) load as
`Quantized` nodes (`ct_format`), and weight-only `Quantized` nodes are saved in that format.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ptjax import ops
from ptjax.interop import bnb_format, ct_format
from ptjax.models.config import ROPE_SCALING_KEYS, ModelConfig, rope_scaling_spec
from ptjax.quant import nf4

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")

_SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "mistral": "MistralForCausalLM"}
# Weight files that unpickle (and so can run code) when loaded: refused, with how to convert.
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth",
                 "consolidated.00.pth")


# ----------------------------------------------------------------------------- config


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _required(hf: Mapping, field: str, source: str):
    if hf.get(field) is None:
        raise ValueError(f"{source}: config has no {field!r}")
    return hf[field]


def _rope(hf: Mapping, source: str) -> tuple[float, tuple]:
    """(theta, rope_scaling) from `rope_parameters` (transformers 5) or `rope_scaling` plus a
    top-level theta (older folders). Plain, `linear` and `llama3` RoPE compute what transformers
    computes; any other type (yarn, dynamic, longrope, ...) is refused by name rather than run
    with the wrong frequencies."""
    params = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or {})
    spec, field = (params, "rope_parameters") if params.get("rope_type", params.get("type")) not in (
        None, "default") else (scaling, "rope_scaling")
    kind = spec.get("rope_type", spec.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError(f"{source}: config has no 'rope_theta' (top level or in rope_parameters)")
    if kind == "default":
        return float(theta), ()
    if kind not in ROPE_SCALING_KEYS:
        raise NotImplementedError(
            f"{source}: {field}.rope_type={kind!r} is not supported "
            f"(supported: default, {', '.join(sorted(ROPE_SCALING_KEYS))})")
    missing = sorted(k for k in ROPE_SCALING_KEYS[kind] if spec.get(k) is None)
    if missing:
        raise ValueError(f"{source}: {field} ({kind}) has no {missing[0]!r}")
    fields = {k: float(spec[k]) for k in ROPE_SCALING_KEYS[kind]}
    if "original_max_position_embeddings" in fields:
        fields["original_max_position_embeddings"] = int(fields["original_max_position_embeddings"])
    return float(theta), rope_scaling_spec(kind, **fields)


def _check_sliding_window(hf: Mapping, source: str) -> None:
    """Mistral v0.1 (and Qwen2 with `use_sliding_window`) attend only to the last W tokens; the
    model here attends to all of them, which differs as soon as a sequence is longer than W."""
    window = hf.get("sliding_window")
    if window is None or hf.get("use_sliding_window") is False:
        return
    context = hf.get("max_position_embeddings")
    if context is None or int(window) < int(context):
        raise NotImplementedError(
            f"{source}: sliding_window={window} is shorter than the context "
            f"(max_position_embeddings={context}); sliding-window attention is not supported")


def _check_supported(hf: Mapping, source: str) -> None:
    """Refuse architectures whose weights would load but compute something else."""
    model_type = hf.get("model_type", "llama")
    if model_type not in _MODEL_TYPES:
        raise NotImplementedError(
            f"{source}: model_type={model_type!r} is not supported; expected one of {sorted(_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"{source}: hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
    if hf.get("mlp_bias"):
        raise NotImplementedError(f"{source}: mlp_bias=true is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise NotImplementedError(f"{source}: attention_bias=true is not supported for llama "
                                  "(it adds an o_proj bias the model has no place for)")
    _check_sliding_window(hf, source)
    quant = hf.get("quantization_config")
    if quant and quant.get("quant_method") == ct_format.METHOD:
        ct_format.check_config(quant, source)
    elif quant:
        bnb_format.check_config(quant, source)


def config_from_hf(source: str | Mapping[str, Any], **overrides) -> ModelConfig:
    """The `ModelConfig` a Hugging Face folder (or its parsed `config.json`) describes.

    Why: the checkpoint's own config is the only reliable statement of its dimensions, and RoPE
    theta moved between transformers versions. `overrides` set ptjax-only fields such as
    `dtype="bfloat16"` or `remat="full"`.
    """
    if isinstance(source, Mapping):
        hf, where = source, "config"
    else:
        where = os.path.join(source, CONFIG_FILE)
        hf = _read_json(where)
    _check_supported(hf, where)
    hidden = int(_required(hf, "hidden_size", where))
    heads = int(_required(hf, "num_attention_heads", where))
    theta, scaling = _rope(hf, where)
    cfg = ModelConfig(
        vocab_size=int(_required(hf, "vocab_size", where)),
        hidden=hidden,
        mlp=int(_required(hf, "intermediate_size", where)),
        layers=int(_required(hf, "num_hidden_layers", where)),
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings") or 0),
        norm_eps=float(_required(hf, "rms_norm_eps", where)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=hf.get("model_type") == "qwen2",
    )
    return dataclasses.replace(cfg, **overrides)


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
    """The `config.json` dict transformers needs to rebuild this model.

    Why: a saved checkpoint is only usable elsewhere if its config states every dimension the
    loader would otherwise default (head_dim, kv heads, theta, tying) to something else.
    """
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    return {
        "architectures": [_MODEL_TYPES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,  # Llama's flag would also add an o_proj bias; Qwen2 ignores it
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
        **({"max_position_embeddings": cfg.max_position_embeddings}
           if cfg.max_position_embeddings else {}),
    }


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its Hugging Face name, pytree path, HF shape, and whether it is an
    `nn.Linear` weight stored [out, in]."""

    hf_key: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    linear: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape in ptjax's pytree ([in, out] for Linear weights)."""
        return self.hf_shape[::-1] if self.linear else self.hf_shape


def _layer_layout(cfg: ModelConfig, i: int) -> Iterator[Entry]:
    pre, node = f"model.layers.{i}.", f"layers_{i}"
    d, q_dim, kv_dim = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    yield Entry(pre + "input_layernorm.weight", (node, "attn_norm", "scale"), (d,))
    for name, width in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
        proj = f"{pre}self_attn.{name}_proj."
        yield Entry(proj + "weight", (node, "attn", name, "kernel"), (width, d), linear=True)
        if cfg.qkv_bias:
            yield Entry(proj + "bias", (node, "attn", name, "bias"), (width,))
    yield Entry(pre + "self_attn.o_proj.weight", (node, "attn", "o", "kernel"), (d, q_dim), True)
    yield Entry(pre + "post_attention_layernorm.weight", (node, "mlp_norm", "scale"), (d,))
    for name, shape in (("gate", (cfg.mlp, d)), ("up", (cfg.mlp, d)), ("down", (d, cfg.mlp))):
        yield Entry(f"{pre}mlp.{name}_proj.weight", (node, "mlp", name, "kernel"), shape, True)


def hf_layout(cfg: ModelConfig) -> list[Entry]:
    """Every tensor a Hugging Face checkpoint of `cfg` holds, in the order transformers writes them.

    Why: loading, saving and shape checks all need the same name/path/transpose table; keeping it
    in one place is what makes the round trip exact.
    """
    entries = [Entry("model.embed_tokens.weight", ("embed", "embedding"), (cfg.vocab_size, cfg.hidden))]
    for i in range(cfg.layers):
        entries.extend(_layer_layout(cfg, i))
    entries.append(Entry("model.norm.weight", ("final_norm", "scale"), (cfg.hidden,)))
    if not cfg.tie_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, cfg.hidden), True))
    return entries


# ----------------------------------------------------------------------------- load


def _refuse_pickles(folder: str) -> None:
    """Weights that only exist as pickles are refused: unpickling a file can run any code in it,
    and a model folder is untrusted input."""
    found = [name for name in _PICKLE_FILES if os.path.exists(os.path.join(folder, name))]
    if found:
        raise ValueError(
            f"{folder}: weights are only in {found[0]}, a pickle file (loading it could run code); "
            "convert it to safetensors in a trusted environment first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
            "safe_serialization=True)`")


def _open(path: str):
    """`safe_open` whose failure on a truncated or corrupt file names that file."""
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _key_files(folder: str) -> dict[str, str]:
    """Map each tensor name to the file holding it (one file, or a sharded index)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        for key, name in weight_map.items():
            if os.path.basename(name) != name or not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"{index}: tensor {key!r} is in shard {name!r}, "
                                        "which is not in the folder")
        return dict(weight_map)
    single = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(single):
        _refuse_pickles(folder)
        raise FileNotFoundError(f"{folder}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")
    with _open(single) as f:
        return {key: WEIGHTS_FILE for key in f.keys()}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _check_unmapped(key_files: Mapping[str, str], used: set[str], cfg: ModelConfig, folder: str):
    """Buffers such as `rotary_emb.inv_freq` are harmless to skip; a bias the model has no place
    for (Llama's `attention_bias` o_proj bias, MLP biases) would silently change its outputs."""
    for key in key_files:
        if key not in used and key.endswith(".bias"):
            raise NotImplementedError(f"{folder}: checkpoint tensor {key!r} has no place in ptjax's "
                                      f"model (biases exist only on q/k/v, when qkv_bias={cfg.qkv_bias})")


def load_params(folder: str, cfg: ModelConfig | None = None) -> dict:
    """Float32 numpy parameters, in ptjax's layout, from a Hugging Face safetensors folder.

    Why: fine-tuning starts from published checkpoints. Every tensor's shape is checked against
    `cfg` (read from the folder's `config.json` when not given) before it is read, so a config
    mismatch fails on the first wrong tensor with both shapes instead of deep inside a matmul.
    """
    cfg = cfg or config_from_hf(folder)
    key_files = _key_files(folder)
    layout = hf_layout(cfg)
    stored = {e.hf_key: ct_format.stored_key(e.hf_key, key_files) for e in layout}
    missing = [e.hf_key for e in layout if stored[e.hf_key] not in key_files]
    if missing:
        raise ValueError(f"{folder}: checkpoint has no tensor {missing[0]!r} "
                         f"({len(missing)} missing in all)")
    _check_unmapped(key_files, {e.hf_key for e in layout}, cfg, folder)
    schemes = _ct_schemes(folder, layout)
    ct_format.check_claimed(key_files, {k.removesuffix(".weight") for k in schemes}, folder)
    read_raw = functools.partial(_read_raw, folder, key_files)
    params: dict = {}
    by_file: dict[str, list[Entry]] = {}
    for entry in layout:
        by_file.setdefault(key_files[stored[entry.hf_key]], []).append(entry)
    for filename, entries in by_file.items():
        path = os.path.join(folder, filename)
        with _open(path) as f:
            for entry in entries:
                state_key = entry.linear and bnb_format.quant_state_key(entry.hf_key, key_files)
                if state_key and schemes:
                    raise ValueError(f"{path}: {entry.hf_key} is bitsandbytes 4-bit, but "
                                     "config.json describes a compressed-tensors checkpoint")
                if state_key:  # bitsandbytes 4-bit: an NF4 node, no requantization
                    _set(params, entry.path, bnb_format.read_node(
                        read_raw, entry.hf_key, state_key, entry.hf_shape, path))
                elif entry.hf_key in schemes:  # compressed-tensors: a Quantized node, same codes
                    _set(params, entry.path, ct_format.read_node(
                        read_raw, entry.hf_key, entry.hf_shape, schemes[entry.hf_key], path))
                else:
                    _set(params, entry.path, _read_tensor(f, entry, path))
    return params


def _ct_schemes(folder: str, layout: list[Entry]) -> dict[str, dict]:
    """The compressed-tensors scheme of each quantized Linear weight, by HF key (empty unless
    `config.json` has a compressed-tensors `quantization_config`)."""
    path = os.path.join(folder, CONFIG_FILE)
    quant = _read_json(path).get("quantization_config") if os.path.exists(path) else None
    if not quant or quant.get("quant_method") != ct_format.METHOD:
        return {}
    ct_format.check_config(quant, path)
    found = {e.hf_key: ct_format.scheme_for(quant, e.hf_key) for e in layout if e.linear}
    return {key: scheme for key, scheme in found.items() if scheme is not None}


def _read_raw(folder: str, key_files: Mapping[str, str], key: str) -> np.ndarray:
    """One tensor as stored, from whichever file holds it; a missing one is named."""
    if key not in key_files:
        raise ValueError(f"{folder}: checkpoint has no tensor {key!r}")
    path = os.path.join(folder, key_files[key])
    with _open(path) as f:
        try:
            return f.get_tensor(key)
        except Exception as e:
            if key in f.keys() and f.get_slice(key).get_dtype() in _FLOAT8:
                return _read_float8(path, key)
            raise ValueError(f"{path}: cannot read tensor {key!r} ({e})") from None


_FLOAT8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn}


def _read_float8(path: str, key: str) -> np.ndarray:
    """safetensors' numpy reader has no float8 dtype; read such a tensor from the file itself
    (an 8-byte little-endian header size, a JSON header, then the raw data)."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_size))[key]
        begin, end = info["data_offsets"]
        f.seek(8 + header_size + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, _FLOAT8[info["dtype"]]).reshape(info["shape"])


def _read_tensor(f, entry: Entry, path: str) -> np.ndarray:
    if entry.hf_key not in f.keys():
        raise ValueError(f"{path}: has no tensor {entry.hf_key!r} (the index says it is here)")
    shape = tuple(f.get_slice(entry.hf_key).get_shape())
    if shape != entry.hf_shape:
        raise ValueError(f"{path}: tensor {entry.hf_key!r} has shape {shape}, "
                         f"but the config expects {entry.hf_shape}")
    try:
        value = np.asarray(f.get_tensor(entry.hf_key), dtype=np.float32)
    except Exception as e:  # a truncated file fails here, on the first tensor past its end
        raise ValueError(f"{path}: cannot read tensor {entry.hf_key!r} ({e})") from None
    return np.ascontiguousarray(value.T) if entry.linear else value


# ----------------------------------------------------------------------------- save


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _hf_tensors(params: Mapping, cfg: ModelConfig, dtype) -> dict[str, np.ndarray]:
    """HF-named, [out, in] numpy tensors; weight nodes (LoRA, ...) are materialized, NF4
    nodes are written in bitsandbytes' 4-bit format, weight-only int8 / int4 / fp8 nodes in
    compressed-tensors'."""
    tensors = {}
    for entry in hf_layout(cfg):
        try:
            leaf = _get(params, entry.path)
        except KeyError:
            raise ValueError(f"params have no {'/'.join(entry.path)} (needed for {entry.hf_key})") from None
        if entry.linear and isinstance(leaf, nf4.NF4):  # stays 4-bit, in bitsandbytes' format
            tensors.update(bnb_format.node_tensors(jax.device_get(leaf), entry.hf_key))
            continue
        if entry.linear and ct_format.writable(leaf):  # stays quantized, same codes
            if tuple(leaf.shape) != entry.shape:
                raise ValueError(f"param {'/'.join(entry.path)} has shape {tuple(leaf.shape)}, "
                                 f"but the config expects {entry.shape}")
            tensors.update(ct_format.node_tensors(jax.device_get(leaf), entry.hf_key))
            continue
        value = np.asarray(jax.device_get(ops.materialize(leaf)), dtype=np.float32)
        if value.shape != entry.shape:
            raise ValueError(f"param {'/'.join(entry.path)} has shape {value.shape}, "
                             f"but the config expects {entry.shape}")
        value = value.T if entry.linear else value
        tensors[entry.hf_key] = np.ascontiguousarray(value.astype(dtype))
    return tensors


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Greedy split in layout order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards


def _remove_old_weights(folder: str) -> None:
    """A stale index or shard set would shadow (or mix with) the weights written now."""
    for name in os.listdir(folder):
        if name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_FILE.match(name):
            os.remove(os.path.join(folder, name))


def _quantization_config(params: Mapping, cfg: ModelConfig) -> dict:
    """`{"quantization_config": ...}` for the nodes `_hf_tensors` keeps quantized (a LoRA over
    one is merged to float), or {} when none is; one folder holds one format."""
    linear = {e.hf_key.removesuffix(".weight"): _get(params, e.path)
              for e in hf_layout(cfg) if e.linear}
    four_bit = [leaf for leaf in linear.values() if isinstance(leaf, nf4.NF4)]
    integer = {name: leaf if ct_format.writable(leaf) else None for name, leaf in linear.items()}
    quantized = any(node is not None for node in integer.values())
    if four_bit and quantized:
        raise ValueError("params mix NF4 and int8/int4/fp8 nodes; a Hugging Face folder holds "
                         "one quantization format (bitsandbytes or compressed-tensors): "
                         "quantize every projection the same way, or materialize one kind")
    if four_bit:
        return {"quantization_config": bnb_format.quantization_config(four_bit)}
    if quantized:
        return {"quantization_config": ct_format.quantization_config(integer)}
    return {}


def save_params(params: Mapping, cfg: ModelConfig, folder: str, dtype: str = "float32",
                max_shard_bytes: int = 2 * 10**9, extra_config: Mapping[str, Any] | None = None) -> None:
    """Write `params` as a Hugging Face folder (`config.json` + safetensors) transformers loads.

    Why: trained weights must leave ptjax for serving and evaluation stacks. `dtype` is the
    stored precision ("float32" round-trips exactly, "bfloat16" halves the size); above
    `max_shard_bytes` the weights are split into shards listed by an index, as transformers does.
    `extra_config` adds fields ptjax does not track (token ids, max_position_embeddings).
    Existing weight files in `folder` are replaced.
    """
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_SAVE_DTYPES)}, got {dtype!r}")
    tensors = _hf_tensors(params, cfg, _SAVE_DTYPES[dtype])
    config = {**config_to_hf(cfg, dtype), **(extra_config or {}),
              **_quantization_config(params, cfg)}
    os.makedirs(folder, exist_ok=True)
    _remove_old_weights(folder)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, WEIGHTS_FILE), metadata=metadata)
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)

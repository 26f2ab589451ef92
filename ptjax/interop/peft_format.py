"""Adapters in Hugging Face PEFT's on-disk format: `adapter_config.json` plus
`adapter_model.safetensors`.

Users exchange LoRA, DoRA, IA3 and soft-prompt adapters as PEFT folders; writing and reading that
exact format lets a ptjax-trained adapter load with `PeftModel.from_pretrained` (and the reverse)
without either side converting anything.

The layouts differ from ptjax's in three ways, all handled here:
- PEFT names modules (`model.layers.3.self_attn.q_proj`); ptjax names pytree paths
  (`layers_3/attn/q/kernel`). `hf_module_name` is the one table between them.
- PEFT stores `nn.Linear` factors [out, in]: `lora_A` is our `a.T` ([r, in]), `lora_B` our
  `b.T` ([out, r]); IA3 vectors are columns (out, 1) or rows (1, in).
- PEFT stores LoRA's `lora_alpha` (per `rank_pattern` / `alpha_pattern` where modules differ);
  ptjax nodes store the resulting `scale`, so alpha is recovered from scale, rank and rsLoRA.

Prompt-learning methods save one tensor, `prompt_embeddings`, holding the final virtual-token
values (never the P-tuning encoder or the prefix MLP). For prefix tuning on grouped-query
models PEFT sizes `token_dim` and `num_attention_heads` by the key/value heads, so the tensor is
[num_virtual_tokens, num_layers * 2 * kv_heads * head_dim], the layout `prompts.prefix_kv` reads.

The files carry values, not placement; both libraries place them the same way (see
`ptjax.peft.prompts`): PROMPT_TUNING and P_TUNING put every virtual token in front of the whole
input, BOS included (in ptjax: method `prompt`, or `ptuning` with
`peft.ptuning_placement = "prepend"`), and PREFIX_TUNING's entries come first in every
attention with the real tokens' positions starting at P. A P-tuning adapter trained with
ptjax's template placement has no PEFT equivalent, so `save_adapter` refuses it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ptjax import ops
from ptjax import tree as ptree
from ptjax.models.config import ModelConfig
from ptjax.peft import prompts
from ptjax.peft.ia3 import IA3
from ptjax.peft.lora import DoRA, LoRA, lora_scale

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel/IA3Model -> LlamaForCausalLM
TASK_TYPE = "CAUSAL_LM"

METHODS = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING",
           "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}
_NODE_TYPES = {"lora": LoRA, "dora": DoRA, "ia3": IA3}
_ADAPTER_NODES = (LoRA, DoRA, IA3)
_SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

_MODULES = (
    (re.compile(r"layers_(\d+)/attn/(q|k|v|o)/kernel"), "model.layers.{}.self_attn.{}_proj"),
    (re.compile(r"layers_(\d+)/mlp/(gate|up|down)/kernel"), "model.layers.{}.mlp.{}_proj"),
    (re.compile(r"lm_head/kernel"), "lm_head"),
)


# ----------------------------------------------------------------------------- module names


def hf_module_name(path: str) -> str | None:
    """The transformers module name (`model.layers.0.mlp.down_proj`) of a ptjax kernel path.

    Why: PEFT keys, `target_modules` and `rank_pattern` all speak in module names; `None` marks
    paths PEFT's Llama layout has no `nn.Linear` for (embeddings, norms, biases).
    """
    for regex, template in _MODULES:
        match = regex.fullmatch(path)
        if match:
            return template.format(*match.groups())
    return None


def _modules(params) -> dict[str, tuple[str, Any]]:
    """Every named module of `params`: module name -> (pytree path, weight or node)."""
    found = {}
    for path, leaf in ptree.flatten_with_paths(params, nodes_as_leaves=True):
        name = hf_module_name(path)
        if name is not None:
            found[name] = (path, leaf)
    return found


def _matches(spec, module: str) -> bool:
    """PEFT's target rule: a string is a regex the whole name must match; a list holds names
    that equal the module name or end it after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith("." + t) for t in spec or ())


def _target_spec(chosen: Iterable[str], universe: Iterable[str]):
    """Short names (`["q_proj", "v_proj"]`) when they pick exactly `chosen` out of `universe`,
    otherwise a regex matching exactly the chosen module names."""
    chosen = set(chosen)
    names = sorted({m.rsplit(".", 1)[-1] for m in chosen})
    if {m for m in universe if _matches(names, m)} == chosen:
        return names
    return "|".join(re.escape(m) for m in sorted(chosen))


def _pattern_key(module: str) -> str:
    """A `rank_pattern` / `alpha_pattern` key for one module. PEFT versions match these with
    `(.*\\.)?{key}$` or `.*\\.{key}$`; dropping the leading `model.` satisfies both."""
    return module.removeprefix("model.")


def _pattern_value(pattern: Mapping | None, module: str, default):
    """The value PEFT would use for `module`: the first matching pattern key, else `default`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _weight_shape(w) -> tuple[int, ...]:
    """[in, out] of an array or a node (nodes without `.shape` are traced, not computed)."""
    if hasattr(w, "shape"):
        return tuple(w.shape)
    return tuple(jax.eval_shape(ops.materialize, w).shape)


# ----------------------------------------------------------------------------- save


def save_adapter(params, model_cfg: ModelConfig, folder: str, *, method: str,
                 base_model_name_or_path: str = "", lora_alpha: float | None = None,
                 rank: int | None = None, dropout: float | None = None, use_rslora: bool = False,
                 target_modules=None, dtype: str = "float32",
                 ptuning_placement: str = "prepend") -> None:
    """Write the adapter in `params` as a PEFT folder that `PeftModel.from_pretrained` loads.

    Why: a trained adapter is only useful outside ptjax in the format the ecosystem exchanges.
    `method` is one of lora, dora, ia3, prompt_tuning, p_tuning, prefix_tuning. For LoRA/DoRA,
    `rank`, `lora_alpha` and `dropout` default to what the nodes hold (the most common rank and
    alpha; modules that differ go to `rank_pattern` / `alpha_pattern`); `use_rslora` must say how
    the nodes' scale was computed, since a scale alone cannot tell. `target_modules` defaults to
    the modules that carry nodes. Prompt methods save `prompts.finalize(params)`'s vectors;
    for p_tuning, `ptuning_placement` says how the adapter was trained, and only "prepend" (the
    placement PEFT's P_TUNING runs with) is accepted. `dtype` ("float32", "bfloat16",
    "float16") is the stored precision.
    """
    if method not in METHODS:
        raise ValueError(f"save_adapter: unknown method {method!r}; "
                         f"choose one of {sorted(METHODS)}")
    if method == "p_tuning" and ptuning_placement != "prepend":
        raise ValueError(f"save_adapter: ptuning_placement={ptuning_placement!r}, but PEFT's "
                         "P_TUNING prepends every virtual token; only an adapter trained with "
                         "ptuning_placement='prepend' computes the same thing there")
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"save_adapter: dtype must be one of {sorted(_SAVE_DTYPES)}, "
                         f"got {dtype!r}")
    common = {"peft_type": METHODS[method], "task_type": TASK_TYPE,
              "base_model_name_or_path": base_model_name_or_path or None, "inference_mode": True}
    if method in ("lora", "dora"):
        config, tensors = _lora_files(params, method, rank=rank, lora_alpha=lora_alpha,
                                      dropout=dropout, use_rslora=use_rslora,
                                      target_modules=target_modules)
    elif method == "ia3":
        config, tensors = _ia3_files(params, target_modules)
    else:
        config, tensors = _prompt_files(params, model_cfg, method)
    _write(folder, {**common, **config}, tensors, _SAVE_DTYPES[dtype])


def _adapter_nodes(params, method: str) -> dict[str, Any]:
    """Module name -> node for every adapter node in `params`, refusing nodes of another method
    or at paths PEFT has no module name for (they would be silently dropped otherwise)."""
    wanted = _NODE_TYPES[method]
    found = {}
    for path, leaf in ptree.flatten_with_paths(params, nodes_as_leaves=True):
        if not isinstance(leaf, _ADAPTER_NODES):
            continue
        if type(leaf) is not wanted:
            raise ValueError(f"save_adapter: {path} holds a {type(leaf).__name__} node, but "
                             f"method={method!r} saves {wanted.__name__} nodes only")
        name = hf_module_name(path)
        if name is None:
            raise ValueError(f"save_adapter: {path} holds a {type(leaf).__name__} node, but "
                             "PEFT's Llama layout has no module there (only the q/k/v/o and "
                             "gate/up/down projections and lm_head)")
        found[name] = leaf
    if not found:
        raise ValueError(f"save_adapter: method={method!r} but params hold no "
                         f"{wanted.__name__} node")
    return found


def _checked_targets(target_modules, nodes: Mapping[str, Any], params):
    """`target_modules` as given (verified to cover every adapted module) or derived."""
    if target_modules is None:
        return _target_spec(nodes, _modules(params))
    if not isinstance(target_modules, str):
        target_modules = sorted(target_modules)
    uncovered = [m for m in nodes if not _matches(target_modules, m)]
    if uncovered:
        raise ValueError(f"save_adapter: target_modules={target_modules!r} does not match "
                         f"{uncovered[0]!r}, which carries an adapter")
    return target_modules


def _most_common(values: Iterable):
    return collections.Counter(values).most_common(1)[0][0]


def _alpha_of(scale: float, rank: int, rslora: bool):
    """lora_alpha from a node's scale: an int when it is one (as users write it), else a float
    rounded to 12 significant digits (so `lora_scale` gives the scale back)."""
    alpha = scale * (math.sqrt(rank) if rslora else rank)
    nearest = round(alpha)
    if math.isclose(alpha, nearest, rel_tol=1e-9, abs_tol=1e-12):
        return int(nearest)
    return float(f"{alpha:.12g}")


def _lora_files(params, method, *, rank, lora_alpha, dropout, use_rslora, target_modules):
    nodes = _adapter_nodes(params, method)
    ranks = {m: int(n.a.shape[1]) for m, n in nodes.items()}
    alphas = {m: _alpha_of(n.scale, ranks[m], use_rslora) for m, n in nodes.items()}
    r = int(rank) if rank is not None else _most_common(ranks.values())
    alpha = lora_alpha if lora_alpha is not None else _most_common(alphas.values())
    if dropout is None:
        rates = {n.dropout for n in nodes.values()}
        if len(rates) > 1:
            raise ValueError(f"save_adapter: nodes use dropout rates {sorted(rates)}; PEFT has one "
                             "lora_dropout, pass dropout= to choose")
        dropout = rates.pop()
    config = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _checked_targets(target_modules, nodes, params),
        "lora_dropout": float(dropout),
        "bias": "none",
        "use_rslora": bool(use_rslora),
        "use_dora": method == "dora",
        "fan_in_fan_out": False,
        "rank_pattern": {_pattern_key(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern_key(m): v for m, v in alphas.items() if v != alpha},
        "modules_to_save": None,
    }
    tensors = {}
    for module, node in nodes.items():
        key = KEY_PREFIX + module
        tensors[key + ".lora_A.weight"] = _host(node.a).T
        tensors[key + ".lora_B.weight"] = _host(node.b).T
        if method == "dora":
            tensors[key + ".lora_magnitude_vector"] = _host(node.magnitude)
    return config, tensors


def _ia3_files(params, target_modules):
    nodes = _adapter_nodes(params, "ia3")
    feedforward = [m for m, n in nodes.items() if n.side == "input"]
    config = {
        "target_modules": _checked_targets(target_modules, nodes, params),
        "feedforward_modules": _target_spec(feedforward, nodes),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    tensors = {}
    for module, node in nodes.items():
        vector = _host(node.ia3)
        column = node.side != "input"  # (out, 1) scales outputs; (1, in) scales inputs
        tensors[KEY_PREFIX + module + ".ia3_l"] = vector[:, None] if column else vector[None, :]
    return config, tensors


def _prompt_files(params, cfg: ModelConfig, method: str):
    part = "prefix" if method == "prefix_tuning" else "prompt"
    if part not in params:
        raise ValueError(f"save_adapter: method={method!r} needs params[{part!r}] "
                         f"(see ptjax.peft.prompts)")
    values = _host(prompts.finalize(params)[part]["embeddings"])
    if part == "prefix":  # keys and values of every layer, sized by the kv heads
        token_dim, heads = cfg.kv_heads * cfg.head_dim, cfg.kv_heads
        width = prompts.prefix_width(cfg)
    else:
        token_dim, heads, width = cfg.hidden, cfg.heads, cfg.hidden
    if values.ndim != 2 or values.shape[1] != width:
        raise ValueError(f"save_adapter: params[{part!r}] has shape {values.shape}, but the model "
                         f"config expects [num_virtual_tokens, {width}]")
    config = {
        "num_virtual_tokens": int(values.shape[0]),
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": cfg.layers,
        **_prompt_method_fields(params[part], method, token_dim),
    }
    return config, {"prompt_embeddings": values}


def _prompt_method_fields(part, method: str, token_dim: int) -> dict:
    """Each method's own config fields. They describe training-time encoders; loading in
    inference mode (how PEFT loads a saved folder) reads the saved vectors only."""
    if method == "prompt_tuning":
        return {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None}
    if method == "prefix_tuning":
        return {"encoder_hidden_size": token_dim, "prefix_projection": False}
    encoder = part.get("encoder")
    if encoder is None:
        return {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": token_dim,
                "encoder_num_layers": 2, "encoder_dropout": 0.0}
    return {"encoder_reparameterization_type": prompts.encoder_kind(encoder).upper(),
            "encoder_hidden_size": int(encoder["hidden"]["kernel"].shape[1]),
            "encoder_num_layers": 2, "encoder_dropout": 0.0}


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float32)


def _write(folder: str, config: dict, tensors: Mapping[str, np.ndarray], dtype) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    stored = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in sorted(tensors.items())}
    save_file(stored, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- load


def load_adapter(params, folder: str):
    """Base `params` with the PEFT adapter in `folder` applied: LoRA/DoRA/IA3 nodes at the named
    modules, or `params["prompt"]` / `params["prefix"]` = {"embeddings": ...}.

    Why: adapters trained with PEFT (or saved by `save_adapter`) should run, train further or
    merge in ptjax. Everything is checked before anything is built: an unknown peft_type, a
    tensor for a module the base lacks, or a shape that disagrees with the base raises
    ValueError naming the file and the key or field. Values load as float32 numpy arrays.
    Prompt-learning adapters are placed as PEFT places them (see the module docstring): a
    P_TUNING file is a `ptuning` adapter with `ptuning_placement = "prepend"`.
    """
    files = _Files(folder)
    config = files.config()
    tensors = files.tensors()
    peft_type = config.get("peft_type")
    loader = _LOADERS.get(peft_type)
    if loader is None:
        raise ValueError(f"{files.config_path}: peft_type {peft_type!r} is not supported; "
                         f"expected one of {sorted(_LOADERS)}")
    return loader(params, config, tensors, files)


class _Files:
    """The two files of an adapter folder, so every error can name the one at fault."""

    def __init__(self, folder: str):
        self.config_path = os.path.join(folder, CONFIG_FILE)
        self.weights_path = os.path.join(folder, WEIGHTS_FILE)

    def config(self) -> dict:
        if not os.path.exists(self.config_path):
            raise FileNotFoundError(f"{self.config_path}: no adapter config")
        with open(self.config_path, encoding="utf-8") as f:
            return json.load(f)

    def tensors(self) -> dict[str, np.ndarray]:
        if not os.path.exists(self.weights_path):
            raise FileNotFoundError(f"{self.weights_path}: no adapter weights")
        with safe_open(self.weights_path, framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}

    def field(self, config: Mapping, name: str):
        if config.get(name) is None:
            raise ValueError(f"{self.config_path}: config has no {name!r}")
        return config[name]

    def bad_tensor(self, key: str, problem: str) -> ValueError:
        return ValueError(f"{self.weights_path}: tensor {key!r} {problem}")


def _refuse_unsupported(config: Mapping, files: _Files, defaults: Mapping[str, Any]) -> None:
    """Settings whose tensors or math ptjax's nodes cannot represent (bias training, fully
    saved modules, Conv1D layouts) would load as something else: refuse them by name."""
    for name, default in defaults.items():
        value = config.get(name)
        if value not in (None, default) and (default or value):
            raise ValueError(f"{files.config_path}: {name}={value!r} is not supported "
                             f"(only {default!r})")


def _group(tensors: Mapping[str, np.ndarray], parts: Mapping[str, str], modules, files: _Files):
    """module name -> {part: array} from keys `base_model.model.<module>.<suffix>`, refusing
    keys of another layout and modules the base params do not have."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in parts if key.endswith("." + s)), None)
        if not key.startswith(KEY_PREFIX) or suffix is None:
            raise files.bad_tensor(key, f"is not a tensor of this adapter type (expected "
                                        f"{KEY_PREFIX}<module>.{{{', '.join(parts)}}})")
        module = key[len(KEY_PREFIX):-len(suffix) - 1]
        if module not in modules:
            raise files.bad_tensor(key, f"names module {module!r}, which the base params do not "
                                        "have")
        grouped.setdefault(module, {})[parts[suffix]] = value
    for module, found in grouped.items():
        for suffix, part in parts.items():
            if part not in found:
                raise ValueError(f"{files.weights_path}: no tensor "
                                 f"{KEY_PREFIX + module + '.' + suffix!r}")
    return grouped


def _base_weight(modules, module: str, files: _Files):
    path, base = modules[module]
    if isinstance(base, _ADAPTER_NODES):
        raise ValueError(f"{files.weights_path}: {path} already holds a {type(base).__name__} "
                         "node; load adapters onto base params")
    return path, base


def _load_lora(params, config, tensors, files: _Files):
    _refuse_unsupported(config, files, {"bias": "none", "modules_to_save": None,
                                        "fan_in_fan_out": False, "layer_replication": None,
                                        "lora_bias": False})
    dora = bool(config.get("use_dora", False))
    parts = {"lora_A.weight": "a", "lora_B.weight": "b"}
    if dora:
        parts["lora_magnitude_vector"] = "magnitude"
    modules = _modules(params)
    nodes = {}
    for module, found in _group(tensors, parts, modules, files).items():
        path, base = _base_weight(modules, module, files)
        nodes[path] = _lora_node(module, base, found, config, files, dora)
    return ptree.map_with_path(lambda p, v: nodes.get(p, v), params, nodes_as_leaves=True)


def _lora_node(module: str, base, found, config, files: _Files, dora: bool):
    key = KEY_PREFIX + module
    fan_in, fan_out = _weight_shape(base)
    r = _pattern_value(config.get("rank_pattern"), module, files.field(config, "r"))
    expected = {"a": (key + ".lora_A.weight", (r, fan_in)),
                "b": (key + ".lora_B.weight", (fan_out, r)),
                "magnitude": (key + ".lora_magnitude_vector", (fan_out,))}
    for part, value in found.items():
        name, shape = expected[part]
        if value.shape != shape:
            raise files.bad_tensor(name, f"has shape {value.shape}, but the base weight "
                                         f"[out={fan_out}, in={fan_in}] and r={r} need {shape}")
    alpha = _pattern_value(config.get("alpha_pattern"), module, files.field(config, "lora_alpha"))
    fields = dict(base=base, a=np.ascontiguousarray(found["a"].T),
                  b=np.ascontiguousarray(found["b"].T),
                  scale=lora_scale(alpha, r, bool(config.get("use_rslora", False))),
                  dropout=float(config.get("lora_dropout") or 0.0))
    if dora:
        return DoRA(magnitude=found["magnitude"], **fields)
    return LoRA(**fields)


def _load_ia3(params, config, tensors, files: _Files):
    _refuse_unsupported(config, files, {"modules_to_save": None, "fan_in_fan_out": False})
    feedforward = config.get("feedforward_modules") or []
    modules = _modules(params)
    nodes = {}
    for module, found in _group(tensors, {"ia3_l": "ia3"}, modules, files).items():
        path, base = _base_weight(modules, module, files)
        fan_in, fan_out = _weight_shape(base)
        is_ff = _matches(feedforward, module)
        shape = (1, fan_in) if is_ff else (fan_out, 1)
        value = found["ia3"]
        if value.shape != shape:
            raise files.bad_tensor(KEY_PREFIX + module + ".ia3_l", (
                f"has shape {value.shape}, but {'a feed-forward' if is_ff else 'an attention'} "
                f"module with [out={fan_out}, in={fan_in}] needs {shape}"))
        nodes[path] = IA3(base=base, ia3=value.reshape(-1), side="input" if is_ff else "output")
    return ptree.map_with_path(lambda p, v: nodes.get(p, v), params, nodes_as_leaves=True)


def _num_layers(params) -> int:
    return sum(1 for k in params if re.fullmatch(r"layers_\d+", k))


def _load_prompt(params, config, tensors, files: _Files):
    prefix = config["peft_type"] == "PREFIX_TUNING"
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{files.config_path}: num_transformer_submodules="
                         f"{config['num_transformer_submodules']} is for encoder-decoder models")
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise files.bad_tensor(extra[0], "is not part of a prompt-learning adapter "
                                         "(only 'prompt_embeddings')")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{files.weights_path}: no tensor 'prompt_embeddings'")
    n = files.field(config, "num_virtual_tokens")
    if prefix:
        layers = _num_layers(params)
        if files.field(config, "num_layers") != layers:
            raise ValueError(f"{files.config_path}: num_layers={config['num_layers']}, but the "
                             f"base params have {layers} layers")
        width = layers * 2 * _weight_shape(params["layers_0"]["attn"]["k"]["kernel"])[1]
    else:
        width = _weight_shape(params["embed"]["embedding"])[1]
    value = tensors["prompt_embeddings"]
    if value.shape != (n, width):
        what = "num_layers * 2 * kv_dim" if prefix else "hidden"
        raise files.bad_tensor("prompt_embeddings", f"has shape {value.shape}, but "
                                                    f"num_virtual_tokens={n} and the base's "
                                                    f"{what}={width} need {(n, width)}")
    return {**params, "prefix" if prefix else "prompt": {"embeddings": value}}


_LOADERS = {"LORA": _load_lora, "IA3": _load_ia3, "PROMPT_TUNING": _load_prompt,
            "P_TUNING": _load_prompt, "PREFIX_TUNING": _load_prompt}

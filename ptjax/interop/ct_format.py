"""compressed-tensors checkpoints: the format llm-compressor writes and vLLM and transformers
serve (`quant_method: "compressed-tensors"` in `config.json`).

Why: an int8 / int4 / fp8 model ptjax quantized should load in vLLM or transformers as the
same codes, and a published W4A16 / W8A16 / FP8 checkpoint should load here as `Quantized`
nodes without requantizing. Facts below are from compressed-tensors 0.20 (its
`pack_quantized`, `naive_quantized`, `quant_args`, `quant_config`, `initialize` modules).

Per quantized `nn.Linear` `M` (weight [out, in]), ct codes are *signed* for every scheme:
[-2^(b-1), 2^(b-1) - 1], zero points too; `w = (q - zero_point) * scale`.

    pack-quantized (int, weight-only: what ct infers for W4A16 and W8A16):
      M.weight_packed      int32 [out, ceil(in * b / 32)]  code i of a row at bits b*i of the
                           row's bit stream, stored as q + 2^(b-1); 32 / b codes per word, the
                           first in the lowest bits; the row's tail is zero-padded
      M.weight_shape       int64 [2] = [out, in]
      M.weight_zero_point  asymmetric only: channel/group packed the same way along *out*
                           (int32 [ceil(out * b / 32), groups]); tensor: int8 [1] unpacked
    naive-quantized (fp8 weight-only: what ct infers), int-/float-quantized (read only):
      M.weight             int8 (int) or float8_e4m3fn (float) [out, in], unpacked
      M.weight_zero_point  asymmetric only: int8, the shape of the scale
    all:
      M.weight_scale       float [out, in / group_size] (group), [out, 1] (channel), [1] (tensor)

ptjax keeps asymmetric codes and zero points unsigned ([0, 2^b - 1]): they differ from ct's by
the constant 2^(b-1), which cancels in `q - zero`, so the stored bytes are the same codes.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Mapping

import jax
import numpy as np

from ptjax.quant import intq

METHOD = "compressed-tensors"
PACKED = "pack-quantized"
UNPACKED = ("naive-quantized", "int-quantized", "float-quantized")
STATUS = "compressed"
_STRATEGIES = ("channel", "group", "tensor")
_ACTORDERS = (None, "weight", "static")  # calibration order only; "group" adds a g_idx
_FLOAT_DTYPES = {"bfloat16": "bfloat16", "float16": "float16"}


# ----------------------------------------------------------------------------- packing


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed b-bit integers [rows, cols] as ct's int32 words [rows, ceil(cols * b / 32)]
    (`pack_to_int32` with packed_dim=1, for b dividing 32)."""
    per_word = 32 // bits
    rows, cols = values.shape
    words = -(-cols // per_word)
    raw = np.zeros((rows, words * per_word), np.uint32)
    raw[:, :cols] = (np.asarray(values, np.int64) + (1 << (bits - 1))).astype(np.uint32)
    raw = raw.reshape(rows, words, per_word) << (np.arange(per_word, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(raw, axis=2).view(np.int32)


def unpack(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """`pack`'s inverse: signed integers (int64) [rows, cols]."""
    per_word = 32 // bits
    u = np.asarray(words, np.int32).view(np.uint32)[:, :, None]
    raw = (u >> (np.arange(per_word, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    return raw.reshape(u.shape[0], -1)[:, :cols].astype(np.int64) - (1 << (bits - 1))


def _ptjax_int_codes(node: intq.Quantized) -> np.ndarray:
    """A node's integer codes as stored by ptjax ([in, out]; signed when symmetric)."""
    codes = np.asarray(node.codes)
    if node.fmt == "int4":  # two per byte along the rows, the first in the low nibble
        nibbles = np.stack([codes & 15, codes >> 4], axis=2).astype(np.int64)
        codes = nibbles.reshape(codes.shape[0], -1, codes.shape[2])
        if node.symmetric:
            codes = np.where(codes > 7, codes - 16, codes)
    return codes.astype(np.int64).reshape(node.kernel_shape)


# ----------------------------------------------------------------------------- write


def writable(leaf) -> bool:
    """Whether `save_params` keeps this leaf quantized in compressed-tensors form. Nodes that
    also round activations are not: ct's dynamic per-token scale (absmax / 127.5) differs from
    ptjax's (absmax / 127), so they are written as float weights, as before."""
    return isinstance(leaf, intq.Quantized) and not leaf.act_fmt


def _bits(node: intq.Quantized) -> int:
    return intq.bits(node.fmt)


def scheme(node: intq.Quantized) -> dict:
    """The config group (less its targets) describing one node: ct's `QuantizationArgs` as it
    serializes them, and the format ct itself infers for a weight-only scheme."""
    weights = {"num_bits": _bits(node), "type": "float" if node.fmt == "fp8" else "int",
               "symmetric": bool(node.symmetric),
               "group_size": int(node.group_size) if node.granularity == "group" else None,
               "strategy": node.granularity, "dynamic": False}
    return {"weights": weights, "input_activations": None, "output_activations": None,
            "format": "naive-quantized" if node.fmt == "fp8" else PACKED}


def node_tensors(node: intq.Quantized, hf_key: str) -> dict[str, np.ndarray]:
    """The checkpoint tensors of one `Quantized` node stored at `hf_key` (`M.weight`), named,
    shaped and typed as compressed-tensors' compressors write them. Same codes, no rounding."""
    module = hf_key.removesuffix(".weight")
    n_in, n_out = node.kernel_shape
    scale = np.asarray(node.scale, np.float32)[:, 0, :].T  # [groups, 1, out] -> [out, groups]
    bits, out = _bits(node), {}
    half = 1 << (bits - 1)
    if node.fmt == "fp8":
        codes = np.asarray(node.codes).reshape(n_in, n_out)
        out[module + ".weight"] = codes.T
    else:
        signed = _ptjax_int_codes(node) - (0 if node.symmetric else half)
        out[module + ".weight_packed"] = pack(signed.T, bits)
        out[module + ".weight_shape"] = np.array([n_out, n_in], np.int64)
    out[module + ".weight_scale"] = scale.reshape(1) if node.granularity == "tensor" else scale
    if not node.symmetric:
        zero = np.asarray(node.zero, np.float32)[:, 0, :].T.astype(np.int64) - half
        out[module + ".weight_zero_point"] = (
            zero.reshape(1).astype(np.int8) if node.granularity == "tensor"
            else pack(zero.T, bits).T)
    # safetensors writes an array's memory as is: a transposed view would be stored scrambled
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def quantization_config(nodes: Mapping[str, intq.Quantized | None]) -> dict:
    """The `quantization_config` for a folder whose Linear modules (by HF module name, e.g.
    `model.layers.0.self_attn.q_proj`) hold these nodes (None: kept float).

    One config group per distinct scheme: targets `Linear` when there is one, else the module
    names; float Linear modules (and a tied `lm_head`, which transformers still builds) are
    ignored, so no reader quantizes them.
    """
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, node in nodes.items():
        if node is not None:
            s = scheme(node)
            groups.setdefault(json.dumps(s, sort_keys=True), (s, []))[1].append(name)
    ignore = [name for name, node in nodes.items() if node is None]
    if "lm_head" not in nodes:
        ignore.append("lm_head")
    config_groups = {
        f"group_{i}": {"targets": ["Linear"] if len(groups) == 1 else names, **s}
        for i, (s, names) in enumerate(groups.values())}
    formats = {s["format"] for s, _ in groups.values()}
    return {"quant_method": METHOD, "config_groups": config_groups,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": STATUS, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


# ----------------------------------------------------------------------------- read


def _ptjax_format(weights: Mapping) -> str | None:
    kind, b = weights.get("type", "int"), weights.get("num_bits", 8)
    return {("int", 8): "int8", ("int", 4): "int4", ("float", 8): "fp8"}.get((kind, b))


def _strategy(weights: Mapping):
    """The strategy, inferred from group_size when absent, as `QuantizationArgs` does."""
    if weights.get("strategy") is not None:
        return weights["strategy"]
    size = weights.get("group_size")
    return "tensor" if size is None else "channel" if size == -1 else "group"


def _group_format(config: Mapping, group: Mapping) -> str:
    """A group's storage format: its own, else the folder's (unless mixed), else the one ct
    infers for a weight-only scheme (`compressors.format.infer_module_format`)."""
    top = config.get("format")
    if group.get("format"):
        return group["format"]
    if top and top != "mixed-precision":
        return top
    return PACKED if (group.get("weights") or {}).get("type", "int") == "int" else "naive-quantized"


def _check_group(config: Mapping, name: str, group, source: str) -> None:
    where = f"{source}: quantization_config.config_groups.{name}"
    if not isinstance(group, Mapping):
        raise ValueError(f"{where}: a preset name ({group!r}) rather than a scheme is not read")
    for field in ("input_activations", "output_activations"):
        if group.get(field) is not None:
            raise ValueError(f"{where}.{field}: activation quantization is not supported "
                             "(ptjax reads weight-only schemes)")
    w = group.get("weights")
    if not isinstance(w, Mapping):
        raise ValueError(f"{where}.weights: missing (ptjax reads weight-only schemes)")
    if _ptjax_format(w) is None:
        raise ValueError(f"{where}.weights: type={w.get('type')!r} num_bits={w.get('num_bits')!r}"
                         " is not supported (int 8, int 4 or float 8)")
    if _strategy(w) not in _STRATEGIES:
        raise ValueError(f"{where}.weights.strategy: {_strategy(w)!r} is not supported "
                         f"(one of {_STRATEGIES})")
    if _strategy(w) == "group" and not (isinstance(w.get("group_size"), int)
                                             and w["group_size"] > 0):
        raise ValueError(f"{where}.weights.group_size: {w.get('group_size')!r} is not a "
                         "positive integer")
    if w.get("dynamic"):
        raise ValueError(f"{where}.weights.dynamic: {w['dynamic']!r}; stored weights need "
                         "static scales")
    if w.get("actorder") not in _ACTORDERS:
        raise ValueError(f"{where}.weights.actorder: {w['actorder']!r} (a g_idx permutation) "
                         "is not supported")
    if w.get("type") == "float" and not w.get("symmetric", True):
        raise ValueError(f"{where}.weights.symmetric: float8 weights are symmetric only")
    fmt = _group_format(config, group)
    if fmt not in (PACKED, *UNPACKED):
        raise ValueError(f"{where}.format: {fmt!r} is not supported (one of "
                         f"{(PACKED, *UNPACKED)})")
    if fmt == PACKED and w.get("type") == "float":
        raise ValueError(f"{where}.format: {PACKED} packs integers, not float weights")


def check_config(config: Mapping, source: str) -> None:
    """Refuse, naming the file and field, a compressed-tensors config ptjax cannot represent
    exactly: activation, KV-cache, sparsity or transform schemes, strategies other than
    channel / group / tensor, bit widths other than int8 / int4 / fp8, uncompressed status."""
    where = f"{source}: quantization_config"
    if config.get("quant_method") != METHOD:
        raise ValueError(f"{where}.quant_method: {config.get('quant_method')!r} is not {METHOD!r}")
    if config.get("quantization_status") != STATUS:
        raise ValueError(f"{where}.quantization_status: {config.get('quantization_status')!r};"
                         f" ptjax reads {STATUS!r} checkpoints only")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config",
                  "moe_sparsity_config"):
        if config.get(field):
            raise ValueError(f"{where}.{field}: not supported (ptjax reads weight-only "
                             "quantization)")
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"{where}.config_groups: missing or empty")
    for name, group in groups.items():
        _check_group(config, name, group, source)
    if not isinstance(config.get("ignore") or [], list):
        raise ValueError(f"{where}.ignore: not a list")


def _matches(module: str, target: str) -> bool:
    """ct's `is_match` for an `nn.Linear` named `module`: `re:` regexes (re.match), the class
    names of nn.Linear, or the exact module name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", "Module") or target == module


def scheme_for(config: Mapping, hf_key: str) -> dict | None:
    """The config group (with its storage format resolved) quantizing the Linear weight at
    `hf_key`, or None when no group targets it or `ignore` names it. Call `check_config`
    first."""
    module = hf_key.removesuffix(".weight")
    if any(_matches(module, t) for t in config.get("ignore") or []):
        return None
    for group in config["config_groups"].values():
        if any(_matches(module, t) for t in group.get("targets") or []):
            return {**group, "format": _group_format(config, group)}
    return None


def stored_key(hf_key: str, keys) -> str:
    """The tensor holding a Linear weight's codes: `M.weight_packed` for a packed one, else
    `hf_key` itself."""
    packed = hf_key.removesuffix(".weight") + ".weight_packed"
    return packed if packed in keys else hf_key


def check_claimed(keys, read_modules, source: str) -> None:
    """Quantized tensors no config group accounts for would otherwise be read as float
    weights (integer codes taken for values) or skipped: refuse the first one."""
    for key in keys:
        module, _, name = key.rpartition(".")
        if name in ("weight_packed", "weight_scale") and module not in read_modules:
            raise ValueError(f"{source}: tensor {key!r} is quantized, but no compressed-tensors "
                             "config group in config.json covers module " + repr(module))


def read_node(read_raw: Callable[[str], np.ndarray], hf_key: str, hf_shape: tuple[int, int],
              scheme: Mapping, source: str) -> intq.Quantized:
    """A `Quantized` node (numpy leaves) for the Linear weight at `hf_key` (`M.weight`, shape
    `hf_shape` = [out, in]) stored under `scheme` (from `scheme_for`). The node holds the
    checkpoint's own codes and scales; every tensor's shape and dtype is checked first and a
    mismatch names it."""
    module = hf_key.removesuffix(".weight")
    w = scheme["weights"]
    fmt, bits = _ptjax_format(w), int(w.get("num_bits", 8))
    symmetric = bool(w.get("symmetric", True))
    granularity, n_out, n_in = _strategy(w), int(hf_shape[0]), int(hf_shape[1])
    group_size = int(w["group_size"]) if granularity == "group" else n_in
    half = 1 << (bits - 1)

    def bad(name, what):
        return ValueError(f"{source}: {module}.{name}: {what}")

    def get(name, shape=None, dtypes=None):
        value = np.asarray(read_raw(f"{module}.{name}"))
        if dtypes is not None and value.dtype.name not in dtypes:
            raise bad(name, f"dtype {value.dtype.name}, expected {' or '.join(dtypes)}")
        if shape is not None and value.shape != tuple(shape):
            raise bad(name, f"shape {value.shape}, expected {tuple(shape)}")
        return value

    if n_in % group_size:
        raise bad("weight_scale", f"group_size {group_size} does not divide in_features {n_in}")
    groups = n_in // group_size
    if scheme["format"] == PACKED:
        shape = [int(v) for v in get("weight_shape").reshape(-1)]
        if shape != [n_out, n_in]:
            raise bad("weight_shape", f"{shape}, but the config expects {[n_out, n_in]}")
        words = get("weight_packed", (n_out, -(-n_in * bits // 32)), ("int32",))
        q = unpack(words, bits, n_in)
    elif fmt == "fp8":
        q = get("weight", (n_out, n_in), ("float8_e4m3fn",)).astype(np.float32)
    else:
        q = get("weight", (n_out, n_in), ("int8",)).astype(np.int64)
        if q.min() < -half or q.max() >= half:
            raise bad("weight", f"codes outside the signed {bits}-bit range")
    scale_shape = (1,) if granularity == "tensor" else (n_out, groups)
    scale = get("weight_scale", dtypes=("float32", "bfloat16", "float16"))
    if scale.shape != scale_shape and not (granularity == "tensor" and scale.size == 1):
        raise bad("weight_scale", f"shape {scale.shape}, expected {scale_shape}")
    zero = None
    if not symmetric:
        if scheme["format"] == PACKED and granularity != "tensor":
            zp = get("weight_zero_point", (-(-n_out * bits // 32), groups), ("int32",))
            zero = unpack(zp.T, bits, n_out).T
        else:
            zero = get("weight_zero_point", dtypes=("int8", "int32", "int64")).astype(np.int64)
            if zero.size != scale.size:
                raise bad("weight_zero_point", f"shape {zero.shape}, expected {scale_shape}")
        if zero.min() < -half or zero.max() >= half:
            raise bad("weight_zero_point", f"values outside the signed {bits}-bit range")
        zero = _grouped_stat(zero + half, granularity, n_out)
        q = q + half
    grouped = np.asarray(q, np.float32).T.reshape(groups, n_in // groups, n_out)
    dtype = _FLOAT_DTYPES.get(scale.dtype.name, "float32")
    try:
        node = intq.from_codes(grouped, _grouped_stat(scale, granularity, n_out), zero,
                               (n_in, n_out), fmt, granularity,
                               group_size if granularity == "group" else 128, symmetric, dtype)
    except ValueError as e:
        raise bad("weight", str(e)) from None
    return jax.device_get(node)


def _grouped_stat(value: np.ndarray, granularity: str, n_out: int) -> np.ndarray:
    """A ct scale or zero point ([out, groups], or one value) as ptjax's [groups, 1, out]."""
    value = np.asarray(value, np.float32)
    if granularity == "tensor":
        return value.reshape(1, 1, 1)
    return np.ascontiguousarray(value.reshape(n_out, -1).T[:, None, :])

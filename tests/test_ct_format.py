"""compressed-tensors folders: `Quantized` nodes saved and loaded back as the same codes, the
packing against a per-element transcription of compressed-tensors' `pack_to_int32`, and
refusals that name the file and field (tests/test_parity_ct.py checks the library itself)."""

import functools
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ptjax import quant
from ptjax.interop import ct_format, hf
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.quant import intq, nf4
from ptjax.train.config import base_config

CFG = preset("tiny")
BASE = jax.device_get(llama.init_params(CFG, jax.random.key(0)))
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 3, CFG.vocab_size)
FORWARD = jax.jit(lambda params: llama.forward(params, CFG, TOKENS))
SCHEMES = {
    "int8-channel": dict(method="int8"),
    "int8-group-asym": dict(method="int8", granularity="group", group_size=16, symmetric=False),
    "int4-group": dict(method="int4", granularity="group", group_size=16),
    "int4-group-asym": dict(method="int4", granularity="group", group_size=8, symmetric=False),
    "int4-channel": dict(method="int4"),
    "int4-tensor-asym": dict(method="int4", granularity="tensor", symmetric=False),
    "fp8-channel": dict(method="fp8"),
}
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _quantized(**kw):
    c = base_config().quant
    for k, v in kw.items():
        c[k] = v
    return jax.device_get(quant.apply(BASE, c))


@functools.cache
def _scheme_params(scheme):
    return _quantized(**SCHEMES[scheme])


def _saved(tmp_path, scheme):
    params = _scheme_params(scheme)
    folder = str(tmp_path / scheme)
    hf.save_params(params, CFG, folder)
    return params, folder


def _nodes(params):
    return {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, intq.Quantized))[0]
        if isinstance(leaf, intq.Quantized)}


def _config(folder):
    return json.load(open(f"{folder}/config.json"))


def _edit_config(folder, edit):
    config = _config(folder)
    edit(config["quantization_config"])
    json.dump(config, open(f"{folder}/config.json", "w"))


# ----------------------------------------------------------------------------- round trip


# CI keeps one scheme per packing (int4 group asymmetric, int4 per tensor, int8, fp8); the
# symmetric int4 group and channel layouts are the same packing with other scale shapes.
@pytest.mark.parametrize("scheme", [
    pytest.param(s, marks=pytest.mark.slow) if s in ("int4-group", "int4-channel") else s
    for s in sorted(SCHEMES)])
def test_quantized_nodes_save_and_load_back_as_the_same_codes(tmp_path, scheme):
    params, folder = _saved(tmp_path, scheme)
    loaded = hf.load_params(folder)
    want, got = _nodes(params), _nodes(loaded)
    assert len(want) == 7 * CFG.layers and got.keys() == want.keys()
    for path, a in want.items():
        b = got[path]
        for field in ("fmt", "granularity", "symmetric", "kernel_shape"):
            assert getattr(b, field) == getattr(a, field), (path, field)
        if a.granularity == "group":
            assert b.group_size == a.group_size
        for field in ("codes", "scale", "zero"):
            x, y = getattr(a, field), getattr(b, field)
            if x is None:
                assert y is None
                continue
            assert np.asarray(y).dtype == np.asarray(x).dtype, (path, field)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=f"{path} {field}")
        np.testing.assert_array_equal(np.asarray(b.materialize()), np.asarray(a.materialize()))
    np.testing.assert_array_equal(FORWARD(loaded), FORWARD(params))
    assert isinstance(loaded["embed"]["embedding"], np.ndarray)
    assert isinstance(loaded["lm_head"]["kernel"], np.ndarray)  # not targeted: stays float


def test_sharded_bfloat16_folders_keep_codes_and_float32_scales(tmp_path):
    params = _scheme_params("int4-group-asym")
    folder = str(tmp_path / "sharded")
    hf.save_params(params, CFG, folder, dtype="bfloat16", max_shard_bytes=2000)
    index = json.load(open(f"{folder}/model.safetensors.index.json"))["weight_map"]
    assert len(set(index.values())) > 1 and index[Q_PROJ + ".weight_scale"]
    loaded = hf.load_params(folder)
    for path, a in _nodes(params).items():
        b = _nodes(loaded)[path]
        for field in ("codes", "scale", "zero"):
            np.testing.assert_array_equal(np.asarray(getattr(b, field)),
                                          np.asarray(getattr(a, field)), err_msg=path)


@pytest.mark.parametrize("scheme", ["int4-group-asym", "int8-channel", "fp8-channel"])
def test_config_describes_one_weight_only_group_and_ignores_lm_head(tmp_path, scheme):
    _, folder = _saved(tmp_path, scheme)
    q = _config(folder)["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    assert q["ignore"] == ["lm_head"]
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    want = {"int4-group-asym": ({"num_bits": 4, "type": "int", "symmetric": False,
                                 "group_size": 8, "strategy": "group", "dynamic": False},
                                "pack-quantized"),
            "int8-channel": ({"num_bits": 8, "type": "int", "symmetric": True,
                              "group_size": None, "strategy": "channel", "dynamic": False},
                             "pack-quantized"),
            "fp8-channel": ({"num_bits": 8, "type": "float", "symmetric": True,
                             "group_size": None, "strategy": "channel", "dynamic": False},
                            "naive-quantized")}[scheme]
    assert (group["weights"], group["format"]) == want
    assert q["format"] == want[1]


def test_distinct_schemes_get_one_group_each_targeting_their_modules():
    attn = _quantized(method="int8", targets=r"layers_\d+/attn/(q|k|v|o)/kernel$")
    mlp = _quantized(method="int4", granularity="group", group_size=16,
                     targets=r"layers_\d+/mlp/(gate|up|down)/kernel$")
    params = dict(attn)
    for i in range(CFG.layers):
        params[f"layers_{i}"] = {**attn[f"layers_{i}"], "mlp": mlp[f"layers_{i}"]["mlp"]}
    linear = {e.hf_key.removesuffix(".weight"): hf._get(params, e.path)
              for e in hf.hf_layout(CFG) if e.linear}
    q = ct_format.quantization_config({k: v if ct_format.writable(v) else None
                                       for k, v in linear.items()})
    assert q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"]
    targets = {g["weights"]["num_bits"]: g["targets"] for g in q["config_groups"].values()}
    assert targets[8] == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert targets[4] == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2)
                          for p in ("gate", "up", "down")]


def test_folders_mixing_nf4_and_int_nodes_are_refused(tmp_path):
    params = _quantized(method="int8", targets=r"attn/q/kernel$")
    params["layers_1"]["mlp"]["up"]["kernel"] = jax.device_get(
        nf4.quantize(BASE["layers_1"]["mlp"]["up"]["kernel"]))
    with pytest.raises(ValueError, match="mix NF4 and int8/int4/fp8"):
        hf.save_params(params, CFG, str(tmp_path / "mixed"))


def test_nodes_that_also_round_activations_are_written_as_float_weights(tmp_path):
    params = _quantized(method="int8", activations="int8")
    hf.save_params(params, CFG, str(tmp_path / "w8a8"))
    assert "quantization_config" not in _config(str(tmp_path / "w8a8"))
    loaded = hf.load_params(str(tmp_path / "w8a8"))
    np.testing.assert_array_equal(loaded["layers_0"]["attn"]["q"]["kernel"],
                                  params["layers_0"]["attn"]["q"]["kernel"].materialize())


# ----------------------------------------------------------------------------- the packing


def _reference_pack(signed, bits):
    """compressed-tensors' `pack_to_int32` (packed_dim=1), one element at a time: element i of a
    row, offset to unsigned by 2^(b-1), lands at bit i*b of the row's stream of int32 words."""
    rows, cols = signed.shape
    words = np.zeros((rows, -(-cols * bits // 32)), np.int64)
    for r in range(rows):
        for i in range(cols):
            raw = int(signed[r, i]) + (1 << (bits - 1))
            assert 0 <= raw < (1 << bits)
            words[r, (i * bits) // 32] |= raw << ((i * bits) % 32)
    return np.where(words >= 2**31, words - 2**32, words).astype(np.int32)


def _reference_unpack(words, bits, cols):
    out = np.zeros((words.shape[0], cols), np.int64)
    for r in range(words.shape[0]):
        for i in range(cols):
            word = int(words[r, (i * bits) // 32]) & 0xFFFFFFFF
            out[r, i] = ((word >> ((i * bits) % 32)) & ((1 << bits) - 1)) - (1 << (bits - 1))
    return out


def _ct_codes(node):
    """A node's codes in compressed-tensors' signed convention, [out, in], from ptjax's own
    (jax) unpacking rather than ct_format's."""
    q = np.asarray(node.grouped_codes()).reshape(node.kernel_shape).T.astype(np.int64)
    return q if node.symmetric else q - (1 << (intq.bits(node.fmt) - 1))


@pytest.mark.parametrize("fmt,granularity,symmetric", [
    ("int4", "channel", True), ("int4", "channel", False), ("int4", "group", False),
    ("int4", "tensor", False), ("int8", "channel", False), ("int8", "tensor", True)])
def test_packing_equals_a_per_element_transcription_of_pack_to_int32(fmt, granularity, symmetric):
    # 20 inputs and 6 outputs: neither fills whole int32 words, so the zero padding is checked
    w = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    node = jax.device_get(intq.quantize(w, fmt, granularity, 10, symmetric))
    tensors = ct_format.node_tensors(node, "m.weight")
    bits = intq.bits(fmt)
    np.testing.assert_array_equal(tensors["m.weight_packed"],
                                  _reference_pack(_ct_codes(node), bits))
    assert tensors["m.weight_packed"].dtype == np.int32
    np.testing.assert_array_equal(tensors["m.weight_shape"], [6, 20])
    zero = None
    if not symmetric and granularity != "tensor":
        zp = tensors["m.weight_zero_point"]  # packed along the output dimension
        want = np.asarray(node.zero)[:, 0, :].T.astype(np.int64) - (1 << (bits - 1))
        np.testing.assert_array_equal(zp, _reference_pack(want.T, bits).T)
        zero = _reference_unpack(zp.T, bits, 6).T
    elif not symmetric:
        zero = tensors["m.weight_zero_point"].astype(np.int64).reshape(1, 1)
        assert tensors["m.weight_zero_point"].dtype == np.int8
    # compressed-tensors' dequantization, w = (q - zero_point) * scale per [out, group]:
    q = _reference_unpack(tensors["m.weight_packed"], bits, 20)
    per_col = np.arange(20) // (10 if granularity == "group" else 20)
    scale = tensors["m.weight_scale"].reshape(6, -1) if granularity != "tensor" else \
        np.broadcast_to(tensors["m.weight_scale"].reshape(1, 1), (6, 1))
    zero = 0 if zero is None else np.broadcast_to(zero, scale.shape)[:, per_col]
    dense = (q - zero).astype(np.float32) * scale[:, per_col]
    np.testing.assert_array_equal(dense, np.asarray(node.materialize()).T)


def test_saved_packed_weights_equal_the_transcription(tmp_path):
    params, folder = _saved(tmp_path, "int4-group-asym")
    stored = load_file(f"{folder}/model.safetensors")
    node = params["layers_1"]["mlp"]["down"]["kernel"]
    np.testing.assert_array_equal(stored["model.layers.1.mlp.down_proj.weight_packed"],
                                  _reference_pack(_ct_codes(node), 4))
    assert stored["model.layers.1.mlp.down_proj.weight_scale"].shape == (32, 64 // 8)
    assert stored["model.layers.1.mlp.down_proj.weight_zero_point"].shape == (32 // 8, 64 // 8)
    assert stored["model.layers.1.mlp.down_proj.weight_shape"].dtype == np.int64


def test_unpacked_int_quantized_folders_load_as_the_same_nodes(tmp_path):
    """The unpacked int8 layout (`int-quantized` / `naive-quantized`: `weight` int8 [out, in])
    reads into the same node as the packed one."""
    params, folder = _saved(tmp_path, "int8-group-asym")
    tensors = load_file(f"{folder}/model.safetensors")
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        module = key.removesuffix(".weight_packed")
        shape = tuple(tensors.pop(module + ".weight_shape"))
        codes = _reference_unpack(tensors.pop(key), 8, shape[1])
        tensors[module + ".weight"] = codes.astype(np.int8)
        zp = tensors[module + ".weight_zero_point"]
        tensors[module + ".weight_zero_point"] = np.ascontiguousarray(
            _reference_unpack(zp.T, 8, shape[0]).T.astype(np.int8))
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    _edit_config(folder, lambda q: q["config_groups"]["group_0"].update(format="int-quantized"))
    loaded = hf.load_params(folder)
    for path, a in _nodes(params).items():
        b = _nodes(loaded)[path]
        np.testing.assert_array_equal(np.asarray(b.codes), np.asarray(a.codes))
        np.testing.assert_array_equal(np.asarray(b.zero), np.asarray(a.zero))


def test_fp8_weights_are_stored_as_float8(tmp_path):
    _, folder = _saved(tmp_path, "fp8-channel")
    raw = hf._read_float8(f"{folder}/model.safetensors", Q_PROJ + ".weight")
    assert raw.dtype == ml_dtypes.float8_e4m3fn and raw.shape == (32, 32)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("edit,field", [
    (lambda q: q["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "config_groups.group_0.input_activations"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="block"),
     "group_0.weights.strategy"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3), "group_0.weights"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=None),
     "group_0.weights.group_size"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"),
     "group_0.weights.actorder"),
    (lambda q: q["config_groups"]["group_0"].update(format="marlin-24"), "group_0.format"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_config.quantization_status"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}),
     "quantization_config.kv_cache_scheme"),
])
def test_configs_ptjax_cannot_represent_are_refused_naming_the_field(tmp_path, edit, field):
    _, folder = _saved(tmp_path, "int4-group-asym")
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=rf"config\.json: .*{field}"):
        hf.config_from_hf(folder)
    with pytest.raises(ValueError, match=field):
        hf.load_params(folder, CFG)  # a given config does not skip the check


@pytest.mark.parametrize("key,value,match", [
    (".weight_shape", np.array([32, 16], np.int64), r"q_proj\.weight_shape: \[32, 16\]"),
    (".weight_scale", np.ones((32, 3), np.float32), r"q_proj\.weight_scale: shape \(32, 3\)"),
    (".weight_packed", np.zeros((32, 3), np.int32), r"q_proj\.weight_packed: shape \(32, 3\)"),
    (".weight_zero_point", np.zeros((4, 4), np.int8), r"q_proj\.weight_zero_point: dtype int8"),
])
def test_tensors_that_do_not_match_the_config_are_refused_naming_them(tmp_path, key, value, match):
    _, folder = _saved(tmp_path, "int4-group-asym")
    tensors = load_file(f"{folder}/model.safetensors")
    tensors[Q_PROJ + key] = value
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors: .*{match}"):
        hf.load_params(folder)


def test_quantized_tensors_no_config_group_covers_are_refused(tmp_path):
    _, folder = _saved(tmp_path, "int8-channel")
    _edit_config(folder, lambda q: q["ignore"].append(Q_PROJ))
    with pytest.raises(ValueError, match=r"q_proj\.weight_packed.*no compressed-tensors config"):
        hf.load_params(folder)

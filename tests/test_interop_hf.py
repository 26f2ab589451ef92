"""Hugging Face checkpoint interop: folders built by hand with HF names and [out, in] layouts."""

from __future__ import annotations

import json
import struct

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ptjax.interop import hf
from ptjax.models import llama
from ptjax.models.config import ModelConfig


def random_params(cfg: ModelConfig, seed: int):
    """Random numpy params in the model's own tree layout (shapes from `init_params`, traced only:
    an eager init compiles every op and takes seconds on a loaded 2-core machine)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: llama.init_params(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


VOCAB, HIDDEN, MLP, LAYERS, HEADS, KV, HEAD_DIM = 11, 8, 12, 2, 4, 2, 4


def hf_config(**fields) -> dict:
    """A small Llama `config.json`, theta in the transformers-5 `rope_parameters` by default."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "hidden_act": "silu", "tie_word_embeddings": False,
    }
    config.update(fields)
    return config


def hf_weights(rng, tied=False, bias=False) -> dict[str, np.ndarray]:
    """Random float32 tensors under Hugging Face names, Linear weights [out, in]."""
    q, kv = HEADS * HEAD_DIM, KV * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (q, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, q),
            p + "mlp.gate_proj.weight": (MLP, HIDDEN), p + "mlp.up_proj.weight": (MLP, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, MLP),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def write_folder(folder, config: dict, weights: dict, shards: int = 1):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    keys = list(weights)
    weight_map = {}
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[n::shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def header_dtypes(path) -> set[str]:
    """Dtypes recorded in a safetensors header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def assert_matches_hf(params, weights, cfg: ModelConfig):
    """Every pytree leaf equals its HF tensor, Linear weights transposed."""
    np.testing.assert_array_equal(params["embed"]["embedding"], weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final_norm"]["scale"], weights["model.norm.weight"])
    for i in range(cfg.layers):
        layer, p = params[f"layers_{i}"], f"model.layers.{i}."
        np.testing.assert_array_equal(layer["attn_norm"]["scale"], weights[p + "input_layernorm.weight"])
        np.testing.assert_array_equal(layer["mlp_norm"]["scale"],
                                      weights[p + "post_attention_layernorm.weight"])
        for name in "qkvo":
            np.testing.assert_array_equal(layer["attn"][name]["kernel"],
                                          weights[f"{p}self_attn.{name}_proj.weight"].T)
        for name in ("gate", "up", "down"):
            np.testing.assert_array_equal(layer["mlp"][name]["kernel"],
                                          weights[f"{p}mlp.{name}_proj.weight"].T)
        for name in "qkv":
            if cfg.qkv_bias:
                np.testing.assert_array_equal(layer["attn"][name]["bias"],
                                              weights[f"{p}self_attn.{name}_proj.bias"])
            else:
                assert "bias" not in layer["attn"][name]
    if cfg.tie_embeddings:
        assert "lm_head" not in params
    else:
        np.testing.assert_array_equal(params["lm_head"]["kernel"], weights["lm_head.weight"].T)


def tree_shapes(params):
    return {"/".join(str(k.key) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


# ----------------------------------------------------------------------------- config


def test_config_reads_rope_parameters_and_defaults():
    cfg = hf.config_from_hf(hf_config(head_dim=None))
    assert cfg == ModelConfig(vocab_size=VOCAB, hidden=HIDDEN, mlp=MLP, layers=LAYERS, heads=HEADS,
                              kv_heads=KV, head_dim=HIDDEN // HEADS, rope_theta=500000.0,
                              norm_eps=1e-5, tie_embeddings=False, qkv_bias=False)


def test_config_top_level_theta_head_dim_and_overrides():
    config = hf_config(rope_theta=10000.0, head_dim=16, num_key_value_heads=None)
    del config["rope_parameters"]
    cfg = hf.config_from_hf(config, dtype="bfloat16")
    assert (cfg.rope_theta, cfg.head_dim, cfg.kv_heads, cfg.dtype) == (10000.0, 16, HEADS, "bfloat16")


def test_config_bias_flags():
    assert hf.config_from_hf(hf_config(model_type="qwen2")).qkv_bias
    assert not hf.config_from_hf(hf_config(model_type="mistral", sliding_window=None)).qkv_bias
    assert hf.config_from_hf(hf_config(tie_word_embeddings=True)).tie_embeddings
    # Llama's attention_bias also puts a bias on o_proj, which the model has no place for.
    with pytest.raises(NotImplementedError, match="attention_bias"):
        hf.config_from_hf(hf_config(attention_bias=True))


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_config_names_a_missing_scaling_field():
    spec = {k: v for k, v in LLAMA3_SCALING.items() if k not in ("low_freq_factor", "factor")}
    with pytest.raises(ValueError, match="rope_scaling \\(llama3\\) has no 'factor'"):
        hf.config_from_hf(hf_config(rope_theta=5e5, rope_parameters=None, rope_scaling=spec))


@pytest.mark.parametrize("fields", [
    {"rope_parameters": {"rope_theta": 5e5, **LLAMA3_SCALING}},  # transformers 5
    {"rope_theta": 5e5, "rope_scaling": LLAMA3_SCALING},  # older folders
])
def test_config_reads_llama3_scaling(fields):
    cfg = hf.config_from_hf(hf_config(max_position_embeddings=131072, **fields))
    assert dict(cfg.rope_scaling) == LLAMA3_SCALING and cfg.rope_theta == 5e5
    assert cfg.max_position_embeddings == 131072
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


def _llama3_inv_freq_f64(dim, theta, factor, low, high, old_len):
    """transformers' `_compute_llama3_parameters`, transcribed per frequency in float64."""
    out = []
    for i in range(0, dim, 2):
        f = 1.0 / theta ** (i / dim)
        wavelen = 2 * np.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_rope_frequencies_follow_the_scaling():
    theta, dim = 5e5, 64
    plain = np.asarray(llama.rope_inv_freq(dim, theta))
    np.testing.assert_allclose(plain, 1.0 / theta ** (np.arange(0, dim, 2) / dim), rtol=1e-6)
    spec = hf.config_from_hf(hf_config(rope_theta=theta, rope_parameters=None,
                                       rope_scaling=LLAMA3_SCALING)).rope_scaling
    got = np.asarray(llama.rope_inv_freq(dim, theta, spec))
    want = _llama3_inv_freq_f64(dim, theta, 32.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert (got < plain).any() and (got == plain).any()  # all three bands are exercised
    assert ((got < plain) & (got > plain / 32 * 1.0001)).any()
    linear = hf.config_from_hf(hf_config(rope_theta=theta, rope_parameters=None,
                                         rope_scaling={"type": "linear", "factor": 2.0}))
    np.testing.assert_allclose(np.asarray(llama.rope_inv_freq(dim, theta, linear.rope_scaling)),
                               plain / 2, rtol=1e-6)


@pytest.mark.parametrize("fields, match", [
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn", "factor": 8.0}},
     "rope_parameters.rope_type='yarn'"),
    ({"rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type='dynamic'"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768},
     "sliding_window=4096"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gemma"}, "gemma"),
])
def test_config_refuses_unsupported(fields, match):
    with pytest.raises(NotImplementedError, match=match):
        hf.config_from_hf(hf_config(**fields))


def test_config_missing_field_named():
    config = hf_config()
    del config["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        hf.config_from_hf(config)


# ----------------------------------------------------------------------------- load


def test_load_maps_and_transposes(tmp_path):
    weights = hf_weights(np.random.default_rng(0))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)  # ignored
    folder = write_folder(tmp_path / "m", hf_config(), weights)
    cfg = hf.config_from_hf(str(folder))
    params = hf.load_params(str(folder))
    assert_matches_hf(params, weights, cfg)
    assert tree_shapes(params) == tree_shapes(random_params(cfg, 0))
    leaves = jax.tree.leaves(params)
    chex.assert_type(leaves, np.float32)
    assert all(isinstance(leaf, np.ndarray) for leaf in leaves)  # numpy: the caller places them


def test_load_top_level_theta_tied_drops_lm_head(tmp_path):
    weights = hf_weights(np.random.default_rng(1))  # lm_head present but tied: ignored
    config = hf_config(rope_theta=10000.0, tie_word_embeddings=True)
    del config["rope_parameters"]
    folder = write_folder(tmp_path / "m", config, weights)
    cfg = hf.config_from_hf(str(folder))
    params = hf.load_params(str(folder), cfg)
    assert cfg.tie_embeddings and cfg.rope_theta == 10000.0
    assert_matches_hf(params, weights, cfg)


def test_load_sharded(tmp_path):
    weights = hf_weights(np.random.default_rng(2))
    folder = write_folder(tmp_path / "m", hf_config(), weights, shards=3)
    assert not (folder / "model.safetensors").exists()
    cfg = hf.config_from_hf(str(folder))
    assert_matches_hf(hf.load_params(str(folder)), weights, cfg)


def test_load_bfloat16_file(tmp_path):
    weights = hf_weights(np.random.default_rng(3))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    folder = write_folder(tmp_path / "m", hf_config(), bf16)
    assert header_dtypes(folder / "model.safetensors") == {"BF16"}
    params = hf.load_params(str(folder))
    exact = {k: v.astype(np.float32) for k, v in bf16.items()}  # bf16 -> f32 is exact
    assert_matches_hf(params, exact, hf.config_from_hf(str(folder)))
    chex.assert_type(params["layers_1"]["mlp"]["down"]["kernel"], np.float32)


def test_load_qwen2_biases(tmp_path):
    weights = hf_weights(np.random.default_rng(4), bias=True)
    folder = write_folder(tmp_path / "m", hf_config(model_type="qwen2"), weights)
    cfg = hf.config_from_hf(str(folder))
    params = hf.load_params(str(folder))
    assert_matches_hf(params, weights, cfg)
    chex.assert_shape(params["layers_0"]["attn"]["k"]["bias"], (KV * HEAD_DIM,))


def test_load_missing_key_names_key_and_folder(tmp_path):
    weights = hf_weights(np.random.default_rng(5))
    del weights["model.layers.1.mlp.up_proj.weight"]
    folder = write_folder(tmp_path / "m", hf_config(), weights)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
        hf.load_params(str(folder))
    assert str(folder) in str(err.value)


def test_load_wrong_shape_names_key_and_shapes(tmp_path):
    weights = hf_weights(np.random.default_rng(6))
    weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((4, HIDDEN), np.float32)
    folder = write_folder(tmp_path / "m", hf_config(), weights)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(4, 8\).*\(8, 8\)"):
        hf.load_params(str(folder))


def test_load_refuses_bias_the_model_cannot_hold(tmp_path):
    weights = hf_weights(np.random.default_rng(7), bias=True)
    weights["model.layers.0.self_attn.o_proj.bias"] = np.ones(HIDDEN, np.float32)
    folder = write_folder(tmp_path / "m", hf_config(model_type="qwen2"), weights)
    with pytest.raises(NotImplementedError, match="o_proj.bias"):
        hf.load_params(str(folder))


def test_config_sliding_window_longer_than_context_is_fine():
    cfg = hf.config_from_hf(json.loads('{"sliding_window": 4096, "max_position_embeddings": 4096}')
                            | hf_config(model_type="mistral"))
    assert cfg.max_position_embeddings == 4096
    hf.config_from_hf(hf_config(model_type="mistral", sliding_window=8192,
                                max_position_embeddings=4096))
    hf.config_from_hf(hf_config(model_type="qwen2", sliding_window=1024, use_sliding_window=False,
                                max_position_embeddings=32768))


def test_load_refuses_pickle_checkpoints(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pickle.*safetensors"):
        hf.load_params(str(folder))


def test_load_index_naming_a_missing_shard(tmp_path):
    folder = write_folder(tmp_path / "m", hf_config(), hf_weights(np.random.default_rng(8)), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json.*model-00002-of-00002"):
        hf.load_params(str(folder))


def test_load_index_pointing_at_the_wrong_shard(tmp_path):
    folder = write_folder(tmp_path / "m", hf_config(), hf_weights(np.random.default_rng(8)), shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors.*has no tensor"):
        hf.load_params(str(folder))


def test_load_truncated_file_names_it(tmp_path):
    folder = write_folder(tmp_path / "m", hf_config(), hf_weights(np.random.default_rng(9)))
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        hf.load_params(str(folder))


# ----------------------------------------------------------------------------- save


@pytest.mark.parametrize("tied, bias", [(False, False), (True, True)])
def test_round_trip_exact(tmp_path, tied, bias):
    cfg = hf.config_from_hf(hf_config(tie_word_embeddings=tied, model_type="qwen2" if bias else "llama"))
    params = random_params(cfg, 1)
    hf.save_params(params, cfg, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == ("qwen2" if bias else "llama")
    assert config["torch_dtype"] == "float32" and config["rope_theta"] == 500000.0
    assert hf.config_from_hf(str(tmp_path / "out")) == cfg
    loaded = hf.load_params(str(tmp_path / "out"))
    chex.assert_trees_all_equal(loaded, params)


def test_save_hf_layout_matches_hand_written_names(tmp_path):
    weights = hf_weights(np.random.default_rng(8))
    folder = write_folder(tmp_path / "in", hf_config(), weights)
    hf.save_params(hf.load_params(str(folder)), hf.config_from_hf(str(folder)), str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved.keys() == weights.keys()
    for key, value in weights.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_save_sharded_bfloat16_replaces_old_files(tmp_path):
    cfg = hf.config_from_hf(hf_config())
    params = random_params(cfg, 2)
    out = str(tmp_path / "out")
    hf.save_params(params, cfg, out)  # a single file first; the sharded save must replace it
    hf.save_params(params, cfg, out, dtype="bfloat16", max_shard_bytes=1000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
    assert all(header_dtypes(tmp_path / "out" / f) == {"BF16"} for f in files)
    # Greedy in layout order: a shard closes when the next tensor would push it past the limit.
    sizes = [int(np.prod(e.hf_shape)) * 2 for e in hf.hf_layout(cfg)]  # bfloat16 bytes
    expected_shards, size = 1, 0
    for n, nbytes in enumerate(sizes):
        if n and size + nbytes > 1000:
            expected_shards, size = expected_shards + 1, 0
        size += nbytes
    assert len(files) == expected_shards
    loaded = hf.load_params(out)
    expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    chex.assert_trees_all_equal(loaded, expected)


def test_save_wrong_shape_names_path(tmp_path):
    cfg = hf.config_from_hf(hf_config())
    params = random_params(cfg, 3)
    params["layers_1"]["mlp"]["gate"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="layers_1/mlp/gate/kernel"):
        hf.save_params(params, cfg, str(tmp_path / "out"))

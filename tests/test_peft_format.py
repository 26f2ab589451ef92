"""PEFT-format adapters: exact file keys, shapes and configs; round trips; an independent numpy
check of the loaded LoRA math in Hugging Face's [out, in] layout; errors that name the file."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ptjax import ops
from ptjax.interop import peft_format as pf
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.nodes import nodes_of
from ptjax.peft import ia3, lora, prompts
from ptjax.tree import map_with_path

CFG = preset("tiny")  # hidden 32, mlp 64, 2 layers, 4 heads, 2 kv heads, head_dim 8
Q, KV = CFG.heads * CFG.head_dim, CFG.kv_heads * CFG.head_dim
PRE = "base_model.model.model.layers."


@pytest.fixture(scope="module")
def base():
    """A tiny base model: `init_params`'s tree and shapes (traced only; an eager or jitted init
    costs seconds on a loaded 2-core machine), filled with numpy draws of its scale."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: llama.init_params(CFG, key), jax.random.key(0))
    return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def randomized(params, seed):
    """Every adapter node's trainable parts replaced by random values (injection leaves B at
    zero and vectors at one, which would hide transposes and swapped factors)."""
    rng = np.random.default_rng(seed)
    types = (lora.LoRA, lora.DoRA, ia3.IA3)

    def fill(x):
        if not isinstance(x, types):
            return x
        return x.map_parts(lambda name, v: v if name == "base" else
                           rng.standard_normal(v.shape).astype(np.float32))

    return jax.tree.map(fill, params, is_leaf=lambda x: isinstance(x, types))


def saved(folder):
    with open(os.path.join(folder, pf.CONFIG_FILE)) as f:
        config = json.load(f)
    return config, load_file(os.path.join(folder, pf.WEIGHTS_FILE))


def shapes(tensors):
    return {k: v.shape for k, v in tensors.items()}


def lora_params(base, targets=r"layers_\d+/attn/(q|v)/kernel$", *, rank, alpha=16.0,
                dropout=0.0, rslora=False, dora=False, seed=2):
    """LoRA/DoRA nodes with random parts at `targets`, built in numpy (`lora.inject`'s eager
    init costs seconds on a loaded machine; the round-trip test covers `inject` itself)."""
    rng = np.random.default_rng(seed)
    scale = lora.lora_scale(alpha, rank, rslora)

    def wrap(path, w):
        if not re.search(targets, path):
            return w
        fan_in, fan_out = w.shape
        parts = dict(base=w, a=rng.standard_normal((fan_in, rank), np.float32),
                     b=rng.standard_normal((rank, fan_out), np.float32), scale=scale,
                     dropout=dropout)
        if dora:
            return lora.DoRA(magnitude=rng.random(fan_out, np.float32) + 0.5, **parts)
        return lora.LoRA(**parts)

    return map_with_path(wrap, base, nodes_as_leaves=True)


def assert_same_nodes(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert type(g) is type(w) and g.scale == w.scale and g.dropout == w.dropout
        for name in ("a", "b", "magnitude"):
            if hasattr(w, name):
                np.testing.assert_array_equal(getattr(g, name), np.asarray(getattr(w, name)))


# ----------------------------------------------------------------------------- LoRA / DoRA


def test_lora_files_and_round_trip(base, tmp_path):
    targets = r"layers_\d+/attn/(q|v)/kernel$"
    injected = lora.inject(base, jax.random.key(1), targets=targets, rank=4, alpha=8.0,
                           dropout=0.05)
    trained = randomized(injected, seed=2)
    pf.save_adapter(trained, CFG, tmp_path, method="lora", base_model_name_or_path="org/tiny")
    config, tensors = saved(tmp_path)
    assert config == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "org/tiny",
        "inference_mode": True, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.05, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    want = {}
    for i in range(CFG.layers):
        for name, out in (("q", Q), ("v", KV)):
            key = f"{PRE}{i}.self_attn.{name}_proj"
            want.update({key + ".lora_A.weight": (4, CFG.hidden), key + ".lora_B.weight": (out, 4)})
            node = trained[f"layers_{i}"]["attn"][name]["kernel"]
            np.testing.assert_array_equal(tensors[key + ".lora_A.weight"], np.asarray(node.a).T)
            np.testing.assert_array_equal(tensors[key + ".lora_B.weight"], np.asarray(node.b).T)
    assert shapes(tensors) == want
    assert all(v.dtype == np.float32 for v in tensors.values())

    loaded = pf.load_adapter(base, tmp_path)
    assert_same_nodes(nodes_of(loaded, lora.LoRA), nodes_of(trained, lora.LoRA))
    forward = jax.jit(llama.forward, static_argnums=1)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 7)), jnp.int32)
    np.testing.assert_array_equal(forward(loaded, CFG, tokens), forward(trained, CFG, tokens))


def test_loaded_lora_matches_numpy_in_hf_layout(base, tmp_path):
    pf.save_adapter(lora_params(base, rank=4, alpha=12.0), CFG, tmp_path, method="lora")
    config, tensors = saved(tmp_path)
    a = tensors[PRE + "1.self_attn.v_proj.lora_A.weight"].astype(np.float64)  # [r, in]
    b = tensors[PRE + "1.self_attn.v_proj.lora_B.weight"].astype(np.float64)  # [out, r]
    w = np.asarray(base["layers_1"]["attn"]["v"]["kernel"], np.float64).T  # HF [out, in]
    x = np.random.default_rng(4).standard_normal((5, CFG.hidden))
    scale = config["lora_alpha"] / config["r"]
    want = x @ w.T + scale * (x @ a.T) @ b.T
    node = pf.load_adapter(base, tmp_path)["layers_1"]["attn"]["v"]["kernel"]
    got = ops.linear(jnp.asarray(x, jnp.float32), node, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_rslora_alpha_is_reconstructed(base, tmp_path):
    trained = lora_params(base, rank=8, alpha=16.0, rslora=True)
    pf.save_adapter(trained, CFG, tmp_path, method="lora", use_rslora=True)
    config, _ = saved(tmp_path)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 16, True)
    loaded = nodes_of(pf.load_adapter(base, tmp_path), lora.LoRA)
    assert {n.scale for n in loaded} == {16.0 / np.sqrt(8)}


def test_mixed_ranks_use_rank_and_alpha_patterns(base, tmp_path):
    params = lora_params(base, r"attn/q/kernel$", rank=4, alpha=8.0)
    params = lora_params(params, r"layers_0/mlp/down/kernel$", rank=2, alpha=6.0)
    pf.save_adapter(params, CFG, tmp_path, method="lora")
    config, tensors = saved(tmp_path)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {"layers.0.mlp.down_proj": 2}
    assert config["alpha_pattern"] == {"layers.0.mlp.down_proj": 6}
    # down_proj only in layer 0: short names would also target layer 1, so a full-match regex
    targets = config["target_modules"]
    assert isinstance(targets, str)
    assert [m for m in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                        "model.layers.1.self_attn.q_proj") if re.fullmatch(targets, m)] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert tensors[PRE + "0.mlp.down_proj.lora_A.weight"].shape == (2, CFG.mlp)
    assert_same_nodes(nodes_of(pf.load_adapter(base, tmp_path), lora.LoRA),
                      nodes_of(params, lora.LoRA))


def test_dora_magnitude_vector(base, tmp_path):
    trained = lora_params(base, rank=4, alpha=8.0, dora=True)
    pf.save_adapter(trained, CFG, tmp_path, method="dora", dtype="bfloat16")
    config, tensors = saved(tmp_path)
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    key = PRE + "0.self_attn.v_proj"
    assert shapes(tensors)[key + ".lora_magnitude_vector"] == (KV,)
    assert len(tensors) == 3 * 2 * CFG.layers
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
    node = trained["layers_0"]["attn"]["v"]["kernel"]
    as_bf16 = np.asarray(node.magnitude).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(tensors[key + ".lora_magnitude_vector"], as_bf16)
    got = pf.load_adapter(base, tmp_path)["layers_0"]["attn"]["v"]["kernel"]
    assert isinstance(got, lora.DoRA) and got.magnitude.dtype == np.float32
    np.testing.assert_array_equal(got.magnitude, as_bf16.astype(np.float32))


def test_loaded_dora_matches_numpy_in_hf_layout(base, tmp_path):
    """PEFT's DoRA from the file's tensors alone: V = W + s B A ([out, in]), n = ||V|| per row,
    y = x V^T * m / n."""
    pf.save_adapter(lora_params(base, rank=4, alpha=12.0, dora=True), CFG, tmp_path, method="dora")
    config, tensors = saved(tmp_path)
    key = PRE + "1.self_attn.q_proj"
    a = tensors[key + ".lora_A.weight"].astype(np.float64)  # [r, in]
    b = tensors[key + ".lora_B.weight"].astype(np.float64)  # [out, r]
    m = tensors[key + ".lora_magnitude_vector"].astype(np.float64)  # [out]
    w = np.asarray(base["layers_1"]["attn"]["q"]["kernel"], np.float64).T  # HF [out, in]
    v = w + config["lora_alpha"] / config["r"] * b @ a
    x = np.random.default_rng(5).standard_normal((5, CFG.hidden))
    want = (x @ v.T) * (m / np.linalg.norm(v, axis=1))
    node = pf.load_adapter(base, tmp_path)["layers_1"]["attn"]["q"]["kernel"]
    got = ops.linear(jnp.asarray(x, jnp.float32), node, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- IA3


def test_ia3_shapes_and_round_trip(base, tmp_path):
    trained = randomized(ia3.inject(base), seed=6)
    pf.save_adapter(trained, CFG, tmp_path, method="ia3")
    config, tensors = saved(tmp_path)
    assert config == {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "inference_mode": True, "target_modules": ["down_proj", "k_proj", "v_proj"],
        "feedforward_modules": ["down_proj"], "fan_in_fan_out": False, "init_ia3_weights": True,
        "modules_to_save": None,
    }
    want = {}
    for i in range(CFG.layers):
        want.update({f"{PRE}{i}.self_attn.k_proj.ia3_l": (KV, 1),
                     f"{PRE}{i}.self_attn.v_proj.ia3_l": (KV, 1),
                     f"{PRE}{i}.mlp.down_proj.ia3_l": (1, CFG.mlp)})
    assert shapes(tensors) == want
    np.testing.assert_array_equal(tensors[PRE + "1.mlp.down_proj.ia3_l"][0],
                                  np.asarray(trained["layers_1"]["mlp"]["down"]["kernel"].ia3))
    got, original = nodes_of(pf.load_adapter(base, tmp_path), ia3.IA3), nodes_of(trained, ia3.IA3)
    assert [n.side for n in got] == [n.side for n in original]
    for g, w in zip(got, original):
        np.testing.assert_array_equal(g.ia3, np.asarray(w.ia3))


def test_loaded_ia3_matches_numpy_in_hf_layout(base, tmp_path):
    """PEFT's IA3 from the file's tensors: k/v scale the projection's output by ia3_l (out, 1);
    down_proj scales its input by ia3_l (1, in)."""
    pf.save_adapter(randomized(ia3.inject(base), seed=6), CFG, tmp_path, method="ia3")
    _, tensors = saved(tmp_path)
    loaded = pf.load_adapter(base, tmp_path)
    rng = np.random.default_rng(7)
    for name, module, width in (("k", "self_attn.k_proj", CFG.hidden),
                                ("down", "mlp.down_proj", CFG.mlp)):
        group = "mlp" if name == "down" else "attn"
        w = np.asarray(base["layers_0"][group][name]["kernel"], np.float64).T  # HF [out, in]
        scale = tensors[f"{PRE}0.{module}.ia3_l"].astype(np.float64)
        x = rng.standard_normal((5, width))
        want = (x * scale[0]) @ w.T if name == "down" else (x @ w.T) * scale[:, 0]
        got = ops.linear(jnp.asarray(x, jnp.float32), loaded["layers_0"][group][name]["kernel"],
                         jnp.float32)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- prompts


def prompt_config(peft_type, n, token_dim, heads, **extra):
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
            "inference_mode": True, "num_virtual_tokens": n, "token_dim": token_dim,
            "num_transformer_submodules": 1, "num_attention_heads": heads,
            "num_layers": CFG.layers, **extra}


def test_prompt_tuning_file(base, tmp_path):
    params = {**base, "prompt": {"embeddings": np.random.default_rng(7).standard_normal(
        (5, CFG.hidden)).astype(np.float32)}}
    pf.save_adapter(params, CFG, tmp_path, method="prompt_tuning")
    config, tensors = saved(tmp_path)
    assert config == prompt_config("PROMPT_TUNING", 5, CFG.hidden, CFG.heads,
                                   prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                                   tokenizer_name_or_path=None)
    assert shapes(tensors) == {"prompt_embeddings": (5, CFG.hidden)}
    loaded = pf.load_adapter(base, tmp_path)["prompt"]["embeddings"]
    np.testing.assert_array_equal(loaded, np.asarray(params["prompt"]["embeddings"]))


def test_p_tuning_saves_encoder_output_only(base, tmp_path):
    init = jax.jit(lambda key: prompts.init_ptuning({}, CFG, key, n=3, hidden=16))  # one compile
    params = {**base, **init(jax.random.key(8))}
    pf.save_adapter(params, CFG, tmp_path, method="p_tuning")
    config, tensors = saved(tmp_path)
    assert config == prompt_config("P_TUNING", 3, CFG.hidden, CFG.heads,
                                   encoder_reparameterization_type="MLP", encoder_hidden_size=16,
                                   encoder_num_layers=2, encoder_dropout=0.0)
    assert list(tensors) == ["prompt_embeddings"]
    want = np.asarray(prompts.virtual_tokens(params["prompt"]))
    np.testing.assert_array_equal(tensors["prompt_embeddings"], want)
    assert set(pf.load_adapter(base, tmp_path)["prompt"]) == {"embeddings"}


def test_p_tuning_lstm_encoder_is_named_in_the_config(base, tmp_path):
    init = jax.jit(lambda key: prompts.init_ptuning({}, CFG, key, n=3, encoder="lstm", hidden=16))
    pf.save_adapter({**base, **init(jax.random.key(8))}, CFG, tmp_path, method="p_tuning")
    config, _ = saved(tmp_path)
    assert config["encoder_reparameterization_type"] == "LSTM"
    assert config["encoder_hidden_size"] == 16


def with_prefix(base, n):
    """Direct prefix values, as `prompts.init_prefix` makes without a reparameterization MLP."""
    values = np.random.default_rng(9).standard_normal((n, prompts.prefix_width(CFG)))
    return {**base, "prefix": {"embeddings": values.astype(np.float32)}}


def test_prefix_tuning_file(base, tmp_path):
    params = with_prefix(base, n=4)
    pf.save_adapter(params, CFG, tmp_path, method="prefix_tuning")
    config, tensors = saved(tmp_path)
    # PEFT sizes prefixes by the key/value heads on grouped-query models
    assert config == prompt_config("PREFIX_TUNING", 4, KV, CFG.kv_heads,
                                   encoder_hidden_size=KV, prefix_projection=False)
    assert shapes(tensors) == {"prompt_embeddings": (4, CFG.layers * 2 * KV)}
    want = np.asarray(prompts.prefix_values(params["prefix"]))
    np.testing.assert_array_equal(tensors["prompt_embeddings"], want)
    np.testing.assert_array_equal(pf.load_adapter(base, tmp_path)["prefix"]["embeddings"], want)


# ----------------------------------------------------------------------------- errors


def edit_config(folder, **fields):
    config, _ = saved(folder)
    with open(os.path.join(folder, pf.CONFIG_FILE), "w") as f:
        json.dump({**config, **fields}, f)


def edit_tensors(folder, fn):
    _, tensors = saved(folder)
    save_file(fn(dict(tensors)), os.path.join(folder, pf.WEIGHTS_FILE))


def wrong_a_shape(t):
    t[PRE + "0.self_attn.q_proj.lora_A.weight"] = np.zeros((4, CFG.hidden + 1), np.float32)
    return t


def missing_layer(t):
    t[PRE + "7.self_attn.q_proj.lora_A.weight"] = t[PRE + "0.self_attn.q_proj.lora_A.weight"]
    return t


def stray_key(t):
    t[PRE + "0.self_attn.q_proj.lora_B.bias"] = np.zeros(Q, np.float32)
    return t


@pytest.mark.parametrize("edit, file, pattern", [
    (lambda d: edit_config(d, peft_type="LOHA"), pf.CONFIG_FILE, r"peft_type 'LOHA'"),
    (lambda d: edit_config(d, modules_to_save=["lm_head"]), pf.CONFIG_FILE, "modules_to_save"),
    (lambda d: edit_config(d, r=2), pf.WEIGHTS_FILE, r"q_proj\.lora_A\.weight.*\(4, 32\).*r=2"),
    (lambda d: edit_tensors(d, wrong_a_shape), pf.WEIGHTS_FILE,
     r"layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(4, 33\)"),
    (lambda d: edit_tensors(d, missing_layer), pf.WEIGHTS_FILE,
     r"layers\.7\.self_attn\.q_proj\.lora_A\.weight'.*do not have"),
    (lambda d: edit_tensors(d, stray_key), pf.WEIGHTS_FILE, r"lora_B\.bias"),
])
def test_errors_name_the_file_and_key(base, tmp_path, edit, file, pattern):
    pf.save_adapter(lora_params(base, rank=4, alpha=8.0), CFG, tmp_path, method="lora")
    edit(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / file)) + ".*" + pattern):
        pf.load_adapter(base, tmp_path)


def test_prefix_width_mismatch_names_the_file(base, tmp_path):
    params = with_prefix(base, n=4)
    pf.save_adapter(params, CFG, tmp_path, method="prefix_tuning")
    edit_tensors(tmp_path, lambda t: {"prompt_embeddings": t["prompt_embeddings"][:, :-1]})
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / pf.WEIGHTS_FILE)) +
                       r".*'prompt_embeddings' has shape \(4, 63\)"):
        pf.load_adapter(base, tmp_path)


def test_save_refuses_nodes_of_another_method(base, tmp_path):
    with pytest.raises(ValueError, match="LoRA node.*IA3"):
        pf.save_adapter(lora_params(base, rank=2), CFG, tmp_path, method="ia3")


def test_p_tuning_files_mean_prepend_placement(base, tmp_path):
    """PEFT's P_TUNING prepends every virtual token; a template-placed adapter would compute
    something else there, so saving one is refused rather than written."""
    params = {**base, "prompt": {"embeddings": np.ones((4, CFG.hidden), np.float32)}}
    with pytest.raises(ValueError, match="ptuning_placement='template'.*prepends every virtual"):
        pf.save_adapter(params, CFG, tmp_path, method="p_tuning", ptuning_placement="template")
    assert not os.path.exists(os.path.join(tmp_path, pf.CONFIG_FILE))
    pf.save_adapter(params, CFG, tmp_path, method="p_tuning", ptuning_placement="prepend")
    assert saved(tmp_path)[0]["peft_type"] == "P_TUNING"

"""Quantization against independent references: bitsandbytes' NF4 algorithm transcribed in
numpy (argmin over levels, reciprocal scaling), closed-form error bounds, exact storage sizes,
the straight-through gradient, QAT conversion and QLoRA's gradient path."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptjax import nodes, peft
from ptjax import tree as ptree
from ptjax.bench import random_batch
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.quant import fake, intq, nf4
from ptjax import quant
from ptjax.train import sft
from ptjax.train import state as state_lib
from ptjax.train.config import base_config

# The 16 NF4 levels as published with QLoRA and used by bitsandbytes (code order 0..15).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


# ----------------------------------------------------------------------------- bitsandbytes in numpy


def bnb_dynamic_map():
    """`create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, transcribed."""
    data = []
    for i in range(7):
        boundaries = np.linspace(0.1, 1, 2**i + 1).astype(np.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10.0 ** (-6 + i) * means).tolist()
        data += (-(10.0 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return np.array(sorted(data), np.float32)


def bnb_blockwise(flat, code, block):
    """bitsandbytes' CPU path: absmax per block, x * (1/absmax), argmin |x - code|."""
    n = flat.size
    codes, absmax = np.empty(n, np.uint8), []
    for s in range(0, n, block):
        chunk = flat[s:s + block].astype(np.float32)
        a = np.float32(np.abs(chunk).max())
        absmax.append(a)
        # An all-zero block (a lone absmax minus its own mean) would divide by zero in
        # bitsandbytes; every code then dequantizes to 0 * code, so code 0.0 is taken.
        scaled = np.clip(chunk * (np.float32(1) / a), -1, 1) if a > 0 else np.zeros_like(chunk)
        codes[s:s + block] = np.argmin(np.abs(scaled[:, None] - code[None, :]), axis=1)
    return codes, np.array(absmax, np.float32)


def bnb_quantize_4bit(weight_out_in, levels, double_quant=True):
    """`quantize_4bit(W, blocksize=64, compress_statistics=...)` of PyTorch's [out, in] W."""
    codes, absmax = bnb_blockwise(weight_out_in.reshape(-1), levels, 64)
    packed = np.append(codes, np.uint8(0)) if codes.size % 2 else codes
    packed = (packed[0::2] << 4 | packed[1::2]).astype(np.uint8)
    if not double_quant:
        return packed, absmax, None
    offset = absmax.mean(dtype=np.float32)
    qabs, absmax2 = bnb_blockwise(absmax - offset, bnb_dynamic_map(), 256)
    return packed, qabs, (absmax2, offset)


def bnb_dequantize(packed, qabs, state2, levels, n):
    codes = np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    if state2 is None:
        absmax = qabs.astype(np.float64)
    else:
        absmax2, offset = state2
        absmax = bnb_dynamic_map()[qabs].astype(np.float64) * np.repeat(absmax2, 256)[:qabs.size]
        absmax = absmax + offset
    return levels[codes].astype(np.float64) * np.repeat(absmax, 64)[:n]


# ----------------------------------------------------------------------------- NF4


def test_nf4_levels_are_the_published_ones():
    np.testing.assert_array_equal(nf4.NF4_LEVELS, np.array(PUBLISHED_NF4, np.float32))
    np.testing.assert_array_equal(nf4.dynamic_code_map(), bnb_dynamic_map())
    code = nf4.dynamic_code_map()
    assert len(set(code.tolist())) == 256 and (np.diff(code) > 0).all()
    assert code[-1] == 1.0 and 0.0 in code and code[0] == np.float32(-0.99296875)


@pytest.mark.parametrize("shape", [(128, 96), (100, 30), (7, 9)])  # [in, out]; odd and short blocks
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_codes_and_absmax_codes_equal_bitsandbytes(shape, double_quant):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 0.2, shape[1])).astype(np.float32)
    w[0, 0] = 0.0  # exact zeros map to level 7
    node = nf4.quantize(jnp.asarray(w), "nf4", double_quant=double_quant)
    packed, qabs, state2 = bnb_quantize_4bit(w.T.copy(), nf4.NF4_LEVELS, double_quant)
    np.testing.assert_array_equal(np.asarray(node.codes), packed)
    np.testing.assert_array_equal(np.asarray(node.absmax), qabs)
    chex.assert_type([node.codes, node.absmax], [jnp.uint8, jnp.uint8 if double_quant else jnp.float32])
    if double_quant:
        np.testing.assert_array_equal(np.asarray(node.absmax_scale), state2[0])
        np.testing.assert_allclose(float(node.offset), state2[1], rtol=1e-6)
    want = bnb_dequantize(packed, qabs, state2, nf4.NF4_LEVELS, w.size).reshape(shape[1], shape[0])
    got = np.asarray(node.dequantize_transposed())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(node.materialize()), want.T, rtol=1e-6, atol=1e-7)
    # The quantization error is bounded by half the widest gap between levels, times the absmax.
    assert np.abs(got - w.T).max() <= 0.5 * 0.3039 * np.abs(w).max() * 1.01


def test_fp4_levels_and_error():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    node = nf4.quantize(jnp.asarray(w), "fp4")
    packed, qabs, state2 = bnb_quantize_4bit(w.T.copy(), nf4.FP4_LEVELS)
    np.testing.assert_array_equal(np.asarray(node.absmax), qabs)
    want = bnb_dequantize(packed, qabs, state2, nf4.FP4_LEVELS, w.size).reshape(32, 64).T
    np.testing.assert_allclose(np.asarray(node.materialize()), want, rtol=1e-6, atol=1e-7)


def test_nf4_storage_is_at_most_4_13_bits_per_parameter():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((576, 1536)).astype(np.float32))
    dq = nf4.quantize(w)
    assert nf4.bits_per_parameter(dq) <= 4.13
    assert dq.codes.nbytes == 576 * 1536 // 2
    assert nf4.bits_per_parameter(nf4.quantize(w, double_quant=False)) == pytest.approx(4.5)


def test_nf4_linear_and_input_gradient_equal_the_dequantized_matmul():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    cot = rng.standard_normal((3, 5, 48)).astype(np.float32)
    node = nf4.quantize(jnp.asarray(w))
    wd = np.asarray(node.materialize(), np.float64)
    f = lambda x: jnp.sum(node.linear(x, jnp.float32) * cot)  # noqa: E731
    np.testing.assert_allclose(node.linear(jnp.asarray(x), jnp.float32), x @ wd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(f)(jnp.asarray(x)), cot @ wd.T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- int8 / int4 / fp8


@pytest.mark.parametrize("fmt,symmetric,granularity", [
    ("int8", True, "channel"), ("int8", False, "channel"), ("int4", True, "group"),
    ("int4", False, "group"), ("int8", True, "tensor"), ("int4", True, "channel")])
def test_integer_error_bound_and_storage(fmt, symmetric, granularity):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 24)) * rng.uniform(0.1, 2, 24)).astype(np.float32)
    node = intq.quantize(jnp.asarray(w), fmt, granularity, group_size=16, symmetric=symmetric)
    deq = np.asarray(node.materialize())
    groups = {"channel": 1, "group": 4, "tensor": 1}[granularity]
    cols = 1 if granularity == "tensor" else 24
    gw = w.reshape(groups, -1, 24)
    if symmetric:
        step = np.abs(gw).max(axis=(1, 2) if granularity == "tensor" else 1) / (2 ** (intq.bits(fmt) - 1) - 1)
    else:
        lo, hi = np.minimum(gw.min(1), 0), np.maximum(gw.max(1), 0)
        step = (hi - lo) / (2 ** intq.bits(fmt) - 1)
    bound = np.broadcast_to(np.reshape(step, (groups, 1, -1)), gw.shape).reshape(w.shape) / 2
    assert (np.abs(deq - w) <= bound * (1 + 1e-5) + 1e-7).all()
    assert np.abs(deq - w).max() > 0  # it did round
    n_codes = w.size // 2 if fmt == "int4" else w.size
    assert node.codes.nbytes == n_codes
    assert node.scale.size == groups * cols


def test_fp8_relative_error_is_e4m3s():
    w = np.random.default_rng(4).standard_normal((32, 16)).astype(np.float32)
    node = intq.quantize(jnp.asarray(w), "fp8")
    deq = np.asarray(node.materialize())
    big = np.abs(w) > 0.05 * np.abs(w).max(0)  # normal range: 3 mantissa bits
    assert (np.abs(deq - w)[big] <= np.abs(w)[big] * 2.0**-4 * 1.0001).all()
    chex.assert_type(node.codes, jnp.float8_e4m3fn)


def test_bad_group_size_and_format_name_the_key():
    with pytest.raises(ValueError, match="quant.group_size"):
        intq.quantize(jnp.ones((30, 4)), "int4", "group", group_size=16)
    with pytest.raises(ValueError, match="quant.method"):
        intq.quantize(jnp.ones((30, 4)), "int3")


# ----------------------------------------------------------------------------- QAT


def test_straight_through_gradient_is_identity_inside_and_zero_outside():
    w = jnp.asarray(np.random.default_rng(5).standard_normal((32, 8)).astype(np.float32))
    cot = jnp.asarray(np.random.default_rng(6).standard_normal((32, 8)).astype(np.float32))
    clip = 0.5
    g = jax.grad(lambda w: jnp.sum(fake.fake_quantize(w, "int4", clip=clip) * cot))(w)
    amax = np.abs(np.asarray(w)).max(0) * clip
    step = amax / 7
    inside = np.abs(np.asarray(w)) <= amax + step / 2
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(np.asarray(g), np.where(inside, np.asarray(cot), 0))
    # The forward value is the rounded weight.
    q = np.clip(np.round(np.asarray(w) / step), -7, 7) * step
    np.testing.assert_allclose(fake.fake_quantize(w, "int4", clip=clip), q, rtol=1e-6, atol=1e-7)


def _quant_cfg(**kw):
    c = base_config().quant
    for k, v in kw.items():
        c[k] = v
    return c


CFG = preset("tiny")
BASE = llama.init_params(CFG, jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 3, CFG.vocab_size)


@pytest.mark.parametrize("method,act", [("int8", ""), ("int4", ""), ("fp8", ""), ("int8", "int8")])
def test_convert_equals_the_fake_quantized_forward(method, act):
    qat = quant.apply(BASE, _quant_cfg(method=method, qat=True, granularity="group",
                                       group_size=16, activations=act))
    assert len(nodes.nodes_of(qat, fake.FakeQuant)) == 2 * 7
    real = quant.convert(qat)
    assert not nodes.nodes_of(real, fake.FakeQuant)
    assert len(nodes.nodes_of(real, intq.Quantized)) == 2 * 7
    a = llama.forward(qat, CFG, TOKENS)
    b = llama.forward(real, CFG, TOKENS)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(a) - np.asarray(llama.forward(BASE, CFG, TOKENS))).max() > 1e-4


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="quant.method"):
        quant.check(_quant_cfg(method="int2"))
    with pytest.raises(ValueError, match="full fine-tuning"):
        quant.check(_quant_cfg(method="nf4"), "full")
    with pytest.raises(ValueError, match="quant.qat"):
        quant.check(_quant_cfg(method="nf4", qat=True))
    with pytest.raises(ValueError, match="quant.targets"):
        quant.apply(BASE, _quant_cfg(method="int8", targets="nothing_here"))


# ----------------------------------------------------------------------------- QLoRA


def test_qlora_gradient_reaches_only_the_adapters_and_codes_keep_their_dtypes():
    q = quant.apply(BASE, _quant_cfg(method="nf4"))
    pc = base_config().peft
    pc.method = "lora"
    params, trainable = peft.apply(q, CFG, pc, jax.random.key(2))
    mask = ptree.select(params, trainable)
    assert {p.rsplit("/", 1)[-1] for p, m in ptree.flatten_with_paths(mask) if m} == {"a", "b"}
    tx = optax.sgd(0.1)
    state = state_lib.create(params, mask, tx, seed=0, frozen_matmul_dtype=jnp.bfloat16)
    frozen = dict(ptree.flatten_with_paths(state.frozen))
    assert frozen["layers_0/attn/q/kernel/base/codes"].dtype == jnp.uint8
    assert frozen["layers_0/attn/q/kernel/base/absmax_scale"].dtype == jnp.float32
    assert frozen["layers_0/attn/q/kernel/base/offset"].dtype == jnp.float32
    batch = random_batch(2, 16, CFG.vocab_size)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))
    new, m = step(state, batch, None)
    chex.assert_trees_all_equal(new.frozen, state.frozen)
    moved = [p for p, v in ptree.flatten_with_paths(jax.tree.map(
        lambda a, b: jnp.abs(a - b).max(), new.trainable, state.trainable)) if v > 0]
    assert moved and all(p.endswith("/b") for p in moved)  # B starts at 0: only B moves first
    # Merging folds LoRA into the dequantized base: equal to the unmerged forward.
    merged = nodes.merge(new.params)
    np.testing.assert_allclose(llama.forward(merged, CFG, TOKENS),
                               llama.forward(new.params, CFG, TOKENS), rtol=1e-4, atol=1e-4)


def _step_temp_bytes(cfg, method: str, batch: int, seq: int) -> int:
    """Scratch memory XLA plans for one bf16 train step of `method` (lora, or qlora: LoRA on
    NF4)."""
    from ptjax import bench

    params, trainable = bench.method_params(cfg, method, bench.host_init(cfg))
    mask = ptree.trainable_mask(params, trainable)
    tx = optax.adamw(1e-4)
    state = state_lib.create(params, mask, tx, seed=0, frozen_matmul_dtype=cfg.compute_dtype)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=cfg, tx=tx), donate_argnums=0)
    compiled = step.lower(state, random_batch(batch, seq, cfg.vocab_size), None).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # compiles a wide QLoRA step (~20 s on 2 cores): a memory property, run with -m slow
def test_qlora_step_dequantizes_one_layer_at_a_time_in_the_backward_pass():
    """QLoRA's point is memory: the backward pass must dequantize each layer's weight when that
    layer's output gradient arrives, not all of them up front (the inputs of every backward
    dequantization exist from the start, so XLA is free to hoist them all to the top of the
    backward pass, where they all stay live at the peak). With activations far smaller than the
    weights, the step's scratch memory must stay within one layer's dequantized weights of bf16
    LoRA's, not grow by every layer's."""
    from ptjax.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=256, hidden=256, mlp=1024, layers=6, heads=4, kv_heads=2,
                      head_dim=64, dtype="bfloat16")
    layer_bf16 = 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 1024)
    lora = _step_temp_bytes(cfg, "lora", 1, 32)
    qlora = _step_temp_bytes(cfg, "qlora", 1, 32)
    assert qlora - lora < 1.5 * layer_bf16, (qlora, lora, layer_bf16)


# ----------------------------------------------------------------------------- bitsandbytes files


def test_nf4_model_saves_in_bitsandbytes_format_and_loads_back_as_nodes(tmp_path):
    import json

    from safetensors.numpy import load_file

    from ptjax.interop import hf

    params = jax.device_get(quant.apply(BASE, _quant_cfg(method="nf4")))
    folder = str(tmp_path / "nf4")
    hf.save_params(params, CFG, folder)
    config = json.load(open(f"{folder}/config.json"))
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    stored = load_file(f"{folder}/model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert stored[key].dtype == np.uint8 and stored[key].shape == (32 * 32 // 2, 1)
    state = json.loads(bytes(stored[key + ".quant_state.bitsandbytes__nf4"]).decode())
    assert state["shape"] == [32, 32] and state["blocksize"] == 64
    np.testing.assert_array_equal(stored[key + ".quant_map"], nf4.NF4_LEVELS)
    loaded = hf.load_params(folder, CFG)
    node = loaded["layers_0"]["attn"]["q"]["kernel"]
    assert isinstance(node, nf4.NF4) and node.kernel_shape == (32, 32)
    want = params["layers_0"]["attn"]["q"]["kernel"]
    np.testing.assert_array_equal(np.asarray(node.codes), np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(node.absmax), np.asarray(want.absmax))
    np.testing.assert_array_equal(llama.forward(loaded, CFG, TOKENS), llama.forward(params, CFG, TOKENS))
    assert isinstance(loaded["embed"]["embedding"], np.ndarray)  # only projections are 4-bit


def test_bitsandbytes_files_with_wrong_parts_or_other_quantization_are_refused(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    from ptjax.interop import hf

    folder = str(tmp_path / "nf4")
    hf.save_params(jax.device_get(quant.apply(BASE, _quant_cfg(method="nf4"))), CFG, folder)
    tensors = load_file(f"{folder}/model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key + ".absmax"] = tensors[key + ".absmax"][:-1]
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj.weight: .*absmax"):
        hf.load_params(folder, CFG)
    config = json.load(open(f"{folder}/config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(f"{folder}/config.json", "w"))
    with pytest.raises(NotImplementedError, match="quantization_config"):
        hf.config_from_hf(folder)


def test_frozen_quantized_scales_keep_float32_when_the_base_is_cast_to_bf16():
    """`state.create` casts frozen matmul weights to the compute dtype, never the (3-D, float)
    per-group scales or zero points of a quantized weight, nor a LoRA base's codes."""
    q = quant.apply(BASE, _quant_cfg(method="int4", granularity="group", group_size=16,
                                     symmetric=False))
    pc = base_config().peft
    pc.method = "lora"
    params, trainable = peft.apply(q, CFG, pc, jax.random.key(2))
    state = state_lib.create(params, ptree.select(params, trainable), optax.sgd(0.1), seed=0,
                             frozen_matmul_dtype=jnp.bfloat16)
    frozen = dict(ptree.flatten_with_paths(state.frozen))
    assert frozen["layers_0/mlp/up/kernel/base/scale"].ndim == 3
    assert frozen["layers_0/mlp/up/kernel/base/scale"].dtype == jnp.float32
    assert frozen["layers_0/mlp/up/kernel/base/zero"].dtype == jnp.float32
    assert frozen["lm_head/kernel"].dtype == jnp.bfloat16  # plain matmul weights are cast

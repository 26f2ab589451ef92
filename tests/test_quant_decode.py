"""Greedy decoding over int8 and NF4 weight nodes: the same tokens as the materialized float
model, the same values as the plain dequantize-then-matmul, and a decode loop that keeps the
weights quantized (no float copy of every weight hoisted out of the sampling loop)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from random_params import spread_params
from ptjax import nodes, ops, quant, sampling
from ptjax.models.config import ModelConfig, preset
from ptjax.quant import intq, nf4
from ptjax.train.config import base_config

CFG = preset("tiny")
N_NEW = 6


def _mixed(params):
    """layers_0 quantized to int8 (per channel), every later layer to NF4 (double-quantized):
    both node types in one tree, so one compile covers both."""
    c = base_config().quant
    c.method, c.targets = "int8", r"layers_0/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"
    params = quant.apply(params, c)
    c.method, c.targets = "nf4", r"layers_[1-9]\d*/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"
    return quant.apply(params, c)


def _greedy(params, cfg, tokens):
    fn = sampling.make_generate_fn(cfg, N_NEW, eos_id=-1)
    out = fn(params, tokens, jnp.ones(tokens.shape, bool), jax.random.key(0))
    return np.asarray(out["tokens"]), np.asarray(out["logprobs"])


def test_greedy_decode_over_int8_and_nf4_nodes_equals_the_materialized_model():
    q = _mixed(spread_params(CFG))
    assert nodes.nodes_of(q, intq.Quantized) and nodes.nodes_of(q, nf4.NF4)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, CFG.vocab_size, (3, 5)), jnp.int32)
    got, got_lp = _greedy(q, CFG, tokens)
    want, want_lp = _greedy(nodes.merge(q, quant.QUANTIZED_NODES), CFG, tokens)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_linear_and_its_gradient_equal_dequantize_then_matmul(rows, dtype):
    """Decode-sized inputs: the barrier that keeps dequantization in the loop changes nothing
    in the values, forward or backward (QLoRA's path)."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, 64)), dtype)
    cot = jnp.asarray(rng.standard_normal((rows, 48)), jnp.float32)
    cases = [(intq.quantize(w), lambda n, x: ops.dense(x, n.dequantize(dtype), dtype)),
             (nf4.quantize(w), lambda n, x: ops.dense_t(x, n.dequantize_transposed(dtype), dtype))]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for node, reference in cases:
        got = jax.jit(lambda x: node.linear(x, dtype))(x)
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32),
                                   np.asarray(reference(node, x), np.float32), rtol=tol, atol=tol)
        loss = lambda f, x: jnp.sum(f(x).astype(jnp.float32) * cot)  # noqa: E731
        g = jax.grad(functools.partial(loss, lambda x: node.linear(x, dtype)))(x)
        g_ref = jax.grad(functools.partial(loss, lambda x: reference(node, x)))(x)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                                   rtol=tol, atol=tol)


def test_decode_loop_carries_the_codes_not_dequantized_float_weights():
    """XLA hoists loop-invariant work out of the sampling `while_loop`: without the barrier in
    the quantized matmuls it dequantizes every weight once, before the loop, and carries a
    float copy of each into it (4x int8 / 8x NF4 in memory for the whole generation). The
    compiled loop's carried state must hold the int8 and NF4 codes and no float array of a
    quantized kernel's size. (Checked on the HLO rather than on temp memory, which also
    depends on the XLA scheduler flags a process sets.)"""
    cfg = ModelConfig(vocab_size=64, hidden=256, mlp=768, layers=2, heads=4, kv_heads=2,
                      head_dim=64)
    q = _mixed(spread_params(cfg))
    sizes = {int(np.prod(n.shape)) for n in nodes.nodes_of(q)
             if isinstance(n, quant.QUANTIZED_NODES)}
    tokens = jnp.zeros((1, 4), jnp.int32)
    fn = sampling.make_generate_fn(cfg, 4, eos_id=-1)
    hlo = fn.lower(q, tokens, jnp.ones(tokens.shape, bool), jax.random.key(0)).compile().as_text()
    loops = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
    assert len(loops) == 1
    carried = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", loops[0])
    assert ("s8", "1,256,768") in carried and ("u8", str(768 * 256 // 2)) in carried
    hoisted = [f"{t}[{d}]" for t, d in carried if t in ("f32", "bf16", "f16")
               and int(np.prod([int(x) for x in d.split(",") if x])) in sizes]
    assert not hoisted, hoisted

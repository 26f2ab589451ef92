"""The fused dequantize-and-multiply CPU kernels (`ptjax.kernels.cpu`, `ptjax.quant.fused`).

Against float64 numpy references of bitsandbytes' NF4/FP4 layout and of per-channel int8 (the
weight rounded to bf16 as XLA's path rounds it), and a bf16 decode through them against the same
decode through XLA's dequantize-then-dot path. Skipped where the kernels cannot run (no AVX-512
BF16 or no C++ compiler); the XLA path they replace is what every other test runs there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from random_params import spread_params
from ptjax import nodes, quant, sampling
from ptjax.bench import cast_floats
from ptjax.kernels import cpu
from ptjax.models.config import ModelConfig
from ptjax.quant import fused, intq, nf4
from ptjax.train.config import base_config

pytestmark = pytest.mark.skipif(not cpu.available(),
                                reason="fused kernels need x86 AVX-512 BF16 and a C++ compiler")


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32),
                      np.float64)


def _nf4_reference(x, codes, absmax, levels, n_out, n_in):
    """x @ W.T in float64 with W [out, in] decoded in numpy from the packed nibbles (first value
    high) and per-block absmax, each weight rounded to bf16 after scaling, x rounded to bf16."""
    codes = np.asarray(codes)
    nibbles = np.stack([codes >> 4, codes & 15], axis=1).reshape(-1)
    absmax = np.asarray(absmax, np.float32)
    block = n_out * n_in // absmax.size
    w = (np.asarray(levels, np.float32)[nibbles].reshape(-1, block) * absmax[:, None])
    return _bf16(x) @ _bf16(w.reshape(n_out, n_in)).T


@pytest.mark.parametrize("rows", [1, 5, 16, 21])
@pytest.mark.parametrize("quant_type,double_quant,blocksize",
                         [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 64),
                          ("nf4", True, 128)])
def test_4bit_kernel_equals_numpy_decode_then_matmul(rows, quant_type, double_quant, blocksize):
    rng = np.random.default_rng(rows)
    n_in, n_out = 256, 96
    node = nf4.quantize(rng.standard_normal((n_in, n_out)).astype(np.float32), quant_type,
                        double_quant, blocksize)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    absmax = node.block_absmax()
    got = cpu.nf4_matmul(jnp.asarray(x), node.codes, absmax, jnp.asarray(nf4.LEVELS[quant_type]))
    assert got.shape == (rows, n_out) and got.dtype == jnp.float32
    want = _nf4_reference(x, node.codes, absmax, nf4.LEVELS[quant_type], n_out, n_in)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 7, 16, 33])
@pytest.mark.parametrize("n_out", [96, 37])  # 37: a last tile of 5 weight rows
def test_int8_kernel_equals_numpy_matmul(rows, n_out):
    rng = np.random.default_rng(rows + n_out)
    node = intq.quantize(rng.standard_normal((192, n_out)).astype(np.float32), "int8")
    x = rng.standard_normal((rows, 192)).astype(np.float32)
    codes = np.asarray(node.codes, np.float64).reshape(192, n_out)
    scale = np.asarray(node.scale, np.float64).reshape(-1)
    got = cpu.int8_matmul(jnp.asarray(x), node.codes.reshape(192, n_out).T, node.scale.reshape(-1))
    np.testing.assert_allclose(np.asarray(got, np.float64), _bf16(x) @ _bf16(codes * scale),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 7, 16])
@pytest.mark.parametrize("n_out", [96, 37])  # 37: a last tile of 5 weight rows
def test_bf16_kernel_equals_numpy_matmul(rows, n_out):
    rng = np.random.default_rng(rows * n_out)
    w_t = rng.standard_normal((n_out, 160)).astype(np.float32)  # [out, in], in = 5 x 32
    x = rng.standard_normal((rows, 160)).astype(np.float32)
    got = cpu.bf16_matmul_nt(jnp.asarray(x), jnp.asarray(w_t, jnp.bfloat16))
    assert got.shape == (rows, n_out) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), _bf16(x) @ _bf16(w_t).T,
                               rtol=1e-5, atol=1e-4)


def test_only_formats_the_kernels_compute_exactly_are_fused():
    w = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    assert fused.fusable(nf4.quantize(w)) and fused.fusable(intq.quantize(w, "int8"))
    assert not fused.fusable(nf4.quantize(w[:96]))  # 96 inputs: a block crosses a row
    assert not fused.fusable(intq.quantize(w, "int8", granularity="group", group_size=32))
    assert not fused.fusable(intq.quantize(w, "int8", symmetric=False))
    assert not fused.fusable(intq.quantize(w, "int4"))
    assert not fused.fusable(intq.quantize(w[:80], "int8"))  # 80 inputs: not 32-wide vectors
    assert not fused.fusable(w)


def _quantized_model(cfg):
    params = spread_params(cfg, seed=3)
    c = base_config().quant
    c.method, c.targets = "int8", r"layers_0/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"
    params = quant.apply(params, c)
    c.method, c.targets = "nf4", r"layers_1/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"
    return cast_floats(quant.apply(params, c), jnp.bfloat16)  # the head and norms in bf16


def test_bf16_decode_through_the_kernels_equals_xla_dequantize_then_dot(monkeypatch):
    """The sampler's decode loop with the kernels (decode_layout wraps the int8 and NF4 nodes,
    and lays the bf16 head out for the bf16 kernel) gives XLA's path's tokens, and log-probs
    within bf16 rounding of the summation order."""
    cfg = ModelConfig(vocab_size=96, hidden=128, mlp=256, layers=2, heads=4, kv_heads=2,
                      head_dim=32, dtype="bfloat16")
    params = _quantized_model(cfg)
    laid_out = sampling.decode_layout(params, batch=4)
    wrapped = nodes.nodes_of(laid_out, fused.FusedDecode)
    assert len(wrapped) == 14 and not nodes.nodes_of(sampling.decode_layout(params, batch=65),
                                                     fused.FusedDecode)
    assert [n.fused for n in nodes.nodes_of(laid_out, sampling.OutInKernel)] == [True]
    tokens = jnp.asarray(np.random.default_rng(4).integers(3, 96, (4, 6)), jnp.int32)

    def greedy():
        # a jit of its own each time (the memoized sampler would reuse the first trace), so the
        # path is chosen again when it is traced
        fn = jax.jit(lambda p, t, m: sampling.generate(p, cfg, t, m, jax.random.key(0),
                                                       max_new_tokens=8, eos_id=-1))
        out = fn(params, tokens, jnp.ones(tokens.shape, bool))
        return np.asarray(out["tokens"]), np.asarray(out["logprobs"])

    got, got_lp = greedy()
    monkeypatch.setattr(fused.cpu, "available", lambda: False)
    want, want_lp = greedy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_lp, want_lp, atol=0.05)

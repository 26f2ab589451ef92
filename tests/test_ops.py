"""The custom-VJP kernels equal plain autodiff of straightforward reference code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import ops


def _rand(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize("out", [12, 24])  # the weight gradient transposes dy, or x
@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 16)])
def test_dense_matches_autodiff_float32(shape, out):
    x, w = _rand(0, shape), _rand(1, (16, out))
    cot = _rand(2, shape[:-1] + (out,))
    ref = lambda x, w: jnp.sum(jnp.einsum("...i,io->...o", x, w) * cot)  # noqa: E731
    got = lambda x, w: jnp.sum(ops.dense(x, w, jnp.float32) * cot)  # noqa: E731
    np.testing.assert_allclose(got(x, w), ref(x, w), rtol=1e-5)
    for a, b in zip(jax.grad(got, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        chex.assert_equal_shape([a, b])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_bf16_gradients_close_to_float32_and_keep_dtypes():
    x, w = _rand(0, (32, 64)).astype(jnp.bfloat16), _rand(1, (64, 48))
    cot = _rand(2, (32, 48))
    f = lambda x, w, dt: jnp.sum(ops.dense(x, w, dt).astype(jnp.float32) * cot)  # noqa: E731
    gx, gw = jax.grad(f, (0, 1))(x, w, jnp.bfloat16)
    chex.assert_type([gx, gw], [jnp.bfloat16, jnp.float32])
    rx, rw = jax.grad(f, (0, 1))(x.astype(jnp.float32), w, jnp.float32)
    np.testing.assert_allclose(gw, rw, rtol=0.05, atol=0.05 * float(jnp.abs(rw).max()))
    np.testing.assert_allclose(gx.astype(jnp.float32), rx, rtol=0.05, atol=0.05 * float(jnp.abs(rx).max()))


def test_real_transpose_is_a_transpose():
    a = jnp.arange(2 * 6 * 10, dtype=jnp.float32).reshape(2, 6, 10)
    np.testing.assert_array_equal(ops.real_transpose(a), np.swapaxes(np.asarray(a), -1, -2))
    b = jnp.arange(15, dtype=jnp.float32).reshape(5, 3)  # odd last dim: plain swap
    np.testing.assert_array_equal(ops.real_transpose(b), np.asarray(b).T)


def _reference_attention(q, k, v, mask, scale):
    # q [b, m, d]; k, v [b, d, t]; mask [batch, s, t] with b = batch*kv and m = g*s
    s = jnp.einsum("bmd,bdt->bmt", q, k) * scale
    batch, n_q, t = mask.shape
    full = jnp.broadcast_to(mask[:, None], (batch, s.shape[0] // batch * s.shape[1] // n_q, n_q, t))
    full = full.reshape(s.shape)
    p = jax.nn.softmax(jnp.where(full, s, -jnp.inf), axis=-1)
    return jnp.einsum("bmt,bdt->bmd", p, v)


def test_grouped_attention_matches_autodiff():
    batch, kv, g, s, t, d = 2, 2, 3, 5, 5, 8
    q = _rand(0, (batch * kv, g * s, d))
    k = _rand(1, (batch * kv, d, t))
    v = _rand(2, (batch * kv, d, t))
    mask = jnp.tril(jnp.ones((s, t), bool))[None].repeat(batch, 0)
    mask = mask.at[1, :, 0].set(False).at[1, 0, 0].set(True)  # a different pattern per batch row
    cot = _rand(3, q.shape)
    got = lambda q, k, v: jnp.sum(ops.grouped_attention(q, k, v, mask, 0.3) * cot)  # noqa: E731
    ref = lambda q, k, v: jnp.sum(_reference_attention(q, k, v, mask, 0.3) * cot)  # noqa: E731
    np.testing.assert_allclose(got(q, k, v), ref(q, k, v), rtol=1e-5)
    for a, b in zip(jax.grad(got, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("chunk", [4, 1024])
def test_fused_cross_entropy_matches_float64_reference(vocab_major, chunk):
    n, d, vocab = 10, 8, 13
    h, w = _rand(0, (n, d)), _rand(1, (vocab, d) if vocab_major else (d, vocab))
    labels = jax.random.randint(jax.random.key(2), (n,), 0, vocab)
    weights = jnp.array([1, 1, 0, 1, 0.5, 1, 1, 0, 1, 1], jnp.float32)

    def reference(h, w, weights):
        hn, wn = np.asarray(h, np.float64), np.asarray(w, np.float64)
        logits = hn @ (wn.T if vocab_major else wn)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = lse - logits[np.arange(n), np.asarray(labels)]
        correct = (logits.argmax(-1) == np.asarray(labels)) * np.asarray(weights)
        return (nll * np.asarray(weights)).sum(), correct.sum()

    loss, correct = ops.fused_cross_entropy(h, w, labels, weights, jnp.float32, vocab_major, chunk)
    ref_loss, ref_correct = reference(h, w, weights)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(correct, ref_correct)

    # Gradients against autodiff of a plain float32 implementation.
    def plain(h, w, weights):
        logits = h @ (w.T if vocab_major else w)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
        return jnp.sum(nll * weights)

    fused = lambda h, w, weights: ops.fused_cross_entropy(  # noqa: E731
        h, w, labels, weights, jnp.float32, vocab_major, chunk)[0] * 1.7
    got = jax.grad(fused, (0, 1, 2))(h, w, weights)
    want = jax.grad(lambda *a: plain(*a) * 1.7, (0, 1, 2))(h, w, weights)
    for a, b in zip(got, want):
        chex.assert_equal_shape([a, b])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_fused_cross_entropy_values_on_the_differentiated_path(vocab_major):
    """Under value_and_grad the forward runs `_ce_fwd`, a separate code path: its loss and
    correct count must equal the float64 reference too (chunk 4 over 10 rows: a ragged tail)."""
    n, d, vocab = 10, 8, 13
    h, w = _rand(0, (n, d)), _rand(1, (vocab, d) if vocab_major else (d, vocab))
    labels = jax.random.randint(jax.random.key(2), (n,), 0, vocab)
    weights = jnp.array([1, 1, 0, 1, 0.5, 1, 1, 0, 1, 1], jnp.float32)
    logits = np.asarray(h, np.float64) @ np.asarray(w.T if vocab_major else w, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    labels = labels.at[:4].set(jnp.asarray(logits.argmax(-1)[:4]))  # some predictions right
    nll = lse - logits[np.arange(n), np.asarray(labels)]
    want_correct = float(((logits.argmax(-1) == np.asarray(labels)) * np.asarray(weights)).sum())
    assert 0 < want_correct < float(weights.sum())

    def f(h, w):  # (loss, correct count): differentiate the loss, carry the count along
        return ops.fused_cross_entropy(h, w, labels, weights, jnp.float32, vocab_major, 4)

    (loss, correct), _ = jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)
    np.testing.assert_allclose(loss, (nll * np.asarray(weights)).sum(), rtol=1e-5)
    np.testing.assert_allclose(correct, want_correct)


def test_bf16_attention_gradients_close_to_float32():
    """bf16 operands with f32 accumulation: gradients within 3% (of the largest entry) of f32."""
    batch, kv, g, s, d = 2, 2, 2, 16, 16
    q, k, v = _rand(0, (batch * kv, g * s, d)), _rand(1, (batch * kv, d, s)), _rand(2, (batch * kv, d, s))
    mask = jnp.tril(jnp.ones((s, s), bool))[None].repeat(batch, 0)
    cot = _rand(3, q.shape)

    def f(q, k, v, dtype):
        out = ops.grouped_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, 0.25)
        return jnp.sum(out.astype(jnp.float32) * cot)

    got = jax.grad(f, (0, 1, 2))(q, k, v, jnp.bfloat16)
    want = jax.grad(_reference_attention_loss, (0, 1, 2))(q, k, v, mask, cot)
    for name, a, b in zip("qkv", got, want):
        chex.assert_type(a, jnp.float32)
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, atol=0.03 * np.abs(b).max(), err_msg=name)


def _reference_attention_loss(q, k, v, mask, cot):
    return jnp.sum(_reference_attention(q, k, v, mask, 0.25) * cot)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_bf16_cross_entropy_gradients_close_to_float32(vocab_major):
    """The fused loss in bf16: loss within 1% and gradients within 3% (of the largest entry) of
    plain float32 autodiff."""
    n, d, vocab = 64, 32, 50
    h, w = _rand(0, (n, d)), _rand(1, (vocab, d) if vocab_major else (d, vocab), 0.3)
    labels = jax.random.randint(jax.random.key(2), (n,), 0, vocab)
    weights = (jax.random.uniform(jax.random.key(3), (n,)) > 0.3).astype(jnp.float32)

    def plain(h, w):
        logits = h @ (w.T if vocab_major else w)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
        return jnp.sum(nll * weights)

    def fused(h, w):
        return ops.fused_cross_entropy(h, w, labels, weights, jnp.bfloat16, vocab_major, 16)[0]

    np.testing.assert_allclose(fused(h, w), plain(h, w), rtol=1e-2)
    for a, b in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
        chex.assert_type(a, jnp.float32)
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, atol=0.03 * np.abs(b).max())

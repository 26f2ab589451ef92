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


def _attention_case(batch=2, kv=2, g=3, s=40, t=75, d=16):
    """Random q/k/v in `grouped_attention`'s layout and a mask with causal structure, a
    different pattern per batch row and one padding row (no visible key)."""
    q = _rand(0, (batch * kv, g * s, d))
    k, v = _rand(1, (batch * kv, d, t)), _rand(2, (batch * kv, d, t))
    mask = jnp.tril(jnp.ones((s, t), bool), k=t - s)[None].repeat(batch, 0)
    mask = mask & (jax.random.uniform(jax.random.key(4), (batch, s, t)) < 0.7)
    mask = mask.at[:, :, t - s].set(True)  # every row sees at least its own key...
    mask = mask.at[0, 3].set(False)  # ...but one padding row, which sees none
    seen = np.broadcast_to(np.asarray(mask.any(-1))[:, None, None, :], (batch, kv, g, s))
    rows = jnp.asarray(seen.reshape(batch * kv, g * s, 1), jnp.float32)
    return q, k, v, mask, rows


@pytest.mark.parametrize("block", [16, 25, 128])  # ragged last block, exact blocks, one block
def test_blockwise_attention_matches_autodiff_and_zeroes_padding_rows(block):
    q, k, v, mask, rows = _attention_case()
    cot = _rand(3, q.shape) * rows  # padding rows carry no loss, as in training
    got = lambda q, k, v: ops.blockwise_attention(q, k, v, mask, 0.3, block)  # noqa: E731
    # the reference's padding row would be a softmax over nothing (NaN): let it see every key;
    # its cotangent is zero, so it adds nothing to any gradient
    visible = mask | ~mask.any(-1, keepdims=True)
    ref = lambda q, k, v: _reference_attention(q, k, v, visible, 0.3)  # noqa: E731
    out = got(q, k, v)
    np.testing.assert_allclose(out * rows, ref(q, k, v) * rows, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(rows[..., 0]) == 0], 0.0)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)  # noqa: E731
    for a, b in zip(jax.grad(loss(got), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        chex.assert_equal_shape([a, b])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_blockwise_attention_bf16_close_to_float32_and_keeps_dtypes():
    q, k, v, mask, rows = _attention_case(s=64, t=64)
    cot = _rand(3, q.shape) * rows

    def f(q, k, v, dtype, fn):
        return jnp.sum(fn(q.astype(dtype), k.astype(dtype), v.astype(dtype)).astype(jnp.float32) * cot)

    blockwise = lambda q, k, v: ops.blockwise_attention(q, k, v, mask, 0.25, 16)  # noqa: E731
    got = jax.grad(f, (0, 1, 2))(q, k, v, jnp.bfloat16, blockwise)
    visible = mask | ~mask.any(-1, keepdims=True)  # as above: the padding row sees all keys
    want = jax.grad(f, (0, 1, 2))(q, k, v, jnp.float32,
                                  lambda q, k, v: _reference_attention(q, k, v, visible, 0.25))
    for name, a, b in zip("qkv", got, want):
        chex.assert_type(a, jnp.float32)
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, atol=0.03 * np.abs(b).max(), err_msg=name)


def test_attention_keeps_the_probabilities_only_for_short_key_ranges():
    """`attention` picks the blockwise kernel past 2 * KEY_BLOCK keys: its backward residuals
    hold no [m, t] matrix (the jaxpr of the VJP's forward shows the residual shapes)."""
    def residual_shapes(t):
        q, k, v = (jnp.zeros((2, 8, 4), jnp.bfloat16), jnp.zeros((2, 4, t), jnp.bfloat16),
                   jnp.zeros((2, 4, t), jnp.bfloat16))
        mask = jnp.ones((1, 4, t), bool)
        _, vjp = jax.vjp(lambda q, k, v: ops.attention(q, k, v, mask, 0.5), q, k, v)
        return [x.shape for x in jax.tree.leaves(vjp)]

    assert (2, 8, 2 * ops.KEY_BLOCK) in residual_shapes(2 * ops.KEY_BLOCK)
    long = 2 * ops.KEY_BLOCK + 1
    assert all(s[-2:] != (8, long) for s in residual_shapes(long)), residual_shapes(long)
    assert (2, 8) in residual_shapes(long)  # the logsumexps


def test_swiglu_matches_autodiff_and_keeps_dtypes():
    gate, up = _rand(0, (6, 24), 3.0), _rand(1, (6, 24))
    cot = _rand(2, (6, 24))
    ref = lambda g, u: jnp.sum(jax.nn.silu(g) * u * cot)  # noqa: E731
    got = lambda g, u: jnp.sum(ops.swiglu(g, u) * cot)  # noqa: E731
    np.testing.assert_allclose(got(gate, up), ref(gate, up), rtol=1e-6)
    for a, b in zip(jax.grad(got, (0, 1))(gate, up), jax.grad(ref, (0, 1))(gate, up)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    gb, ub = gate.astype(jnp.bfloat16), up.astype(jnp.bfloat16)
    chex.assert_type([ops.swiglu(gb, ub), *jax.grad(
        lambda g, u: jnp.sum(ops.swiglu(g, u).astype(jnp.float32)), (0, 1))(gb, ub)],
        jnp.bfloat16)


def test_bf16_residuals_are_kept_as_their_bits():
    """`keep` stores bf16 residuals as uint16 on CPU (XLA's CPU scan stacks them in place
    then) and `unkeep` returns the same values; other dtypes pass through."""
    tree = (jnp.array([1.5, -2.25], jnp.bfloat16), jnp.array([3.0]), jnp.array([1], jnp.int8))
    kept = ops.keep(tree)
    assert [x.dtype for x in kept] == [jnp.uint16, jnp.float32, jnp.int8]
    back = ops.unkeep(kept)
    chex.assert_trees_all_equal(back, tree)
    with ops.portable_kernels():
        assert ops.keep(tree)[0].dtype == jnp.bfloat16


def test_portable_kernels_drop_the_cpu_copies_not_the_numbers():
    """Under `portable_kernels` (the GPU/TPU path) `real_transpose` is a plain transpose and
    dense gradients are unchanged."""
    a = _rand(0, (6, 10))
    # fresh functions: a trace is cached per function, whatever the context
    with ops.portable_kernels():
        assert not ops.cpu_layouts()
        jaxpr = str(jax.make_jaxpr(lambda a: ops.real_transpose(a))(a))
        np.testing.assert_array_equal(ops.real_transpose(a), np.asarray(a).T)
        x, w, cot = _rand(1, (8, 10)), _rand(2, (10, 12)), _rand(3, (8, 12))
        portable = jax.grad(lambda x, w: jnp.sum(ops.dense(x, w, jnp.float32) * cot), (0, 1))(x, w)
    assert ops.cpu_layouts()
    assert "reshape" in str(jax.make_jaxpr(lambda a: ops.real_transpose(a))(a))
    assert "reshape" not in jaxpr
    cpu = jax.grad(lambda x, w: jnp.sum(ops.dense(x, w, jnp.float32) * cot), (0, 1))(x, w)
    chex.assert_trees_all_close(portable, cpu, rtol=1e-6)

"""The model's only matmul and lookup entry points, plus the fused kernels behind them.

`linear(x, w)` and `embed(ids, table)` dispatch on the weight's type: a plain array takes the
fast dense path below; a weight node (LoRA, NF4, FakeQuant, ...) provides its own `linear`
method, which usually calls back into `linear` on the array it wraps. The model never learns
about a new method.

Why custom VJPs: XLA's CPU backend runs a bf16 x bf16 -> f32 dot in its fast library only when
the left operand contracts over its last dimension, neither operand comes from a transpose it
can fold, and both operands are bf16. Plain autodiff of `x @ w` breaks all three in the
backward pass (`x^T dy` contracts the left operand's first dimension; cotangents are f32), so
it silently runs at f32 speed. The VJPs here cast cotangents to the compute dtype and write
every gradient dot in a fast form, materializing the one transpose they need in a way XLA does
not fold back into the dot (`real_transpose`). `tests/test_hlo_layouts.py` guards this.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ptjax.tree import is_weight_node

F32 = jnp.float32


def _dot(a, b, contract_a: int, contract_b: int, batch: int = 0):
    """dot_general with `batch` leading batch dims and f32 accumulation."""
    dims = (((contract_a,), (contract_b,)), (tuple(range(batch)), tuple(range(batch))))
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def real_transpose(a):
    """Swap the last two axes with a copy XLA cannot fold into the consuming dot.

    A plain transpose feeding a dot is folded into the dot's dimension numbers, which is exactly
    the slow layout we are avoiding. Splitting an axis first turns it into a rank-changing
    reshape/transpose/reshape that XLA materializes as a row-major copy.
    """
    *lead, m, n = a.shape
    if n % 2 == 0:
        b = a.reshape(*lead, m, 2, n // 2)
        b = jnp.moveaxis(b, -3, -1)  # [..., 2, n/2, m]
        return b.reshape(*lead, n, m)
    return jnp.swapaxes(a, -1, -2)


# ----------------------------------------------------------------------------- dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x, w, dtype):
    """`x @ w` for x [..., in], w [in, out], operands cast to `dtype`, f32 accumulation."""
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = _few_rows(lambda a, dt: _dot(a, w.astype(dt), 1, 0), x2, dtype)
    return y.astype(dtype).reshape(*x.shape[:-1], w.shape[-1])


def dense_vocab_major(h, table, dtype):
    """Float32 `h @ table^T` for h [..., dim] and a [vocab, dim] table (a tied output head),
    both operands contracting their last dimension."""
    h2 = h.reshape(-1, h.shape[-1]).astype(dtype)
    y = _few_rows(lambda a, dt: _dot(a, table.astype(dt), 1, 1), h2, dtype)
    return y.reshape(*h.shape[:-1], table.shape[0])


def _dense_fwd(x, w, dtype):
    return dense(x, w, dtype), (x, w)


def _dense_bwd(dtype, res, dy):
    x, w = res
    xc = x.astype(dtype).reshape(-1, x.shape[-1])
    wc = w.astype(dtype)
    dy = dy.astype(dtype).reshape(-1, dy.shape[-1])
    dx = _dot(dy, wc, 1, 1)  # [m, out] x [in, out] -> [m, in]: both contract their last dim
    dw = weight_gradient(xc, dy)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_t(x, w_t, dtype):
    """`x @ w_t^T` for x [..., in], w_t [out, in] (PyTorch's layout, e.g. a dequantized 4-bit
    weight), without materializing the transpose: both operands contract their last dim."""
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = _few_rows(lambda a, dt: _dot(a, w_t.astype(dt), 1, 1), x2, dtype)
    return y.astype(dtype).reshape(*x.shape[:-1], w_t.shape[0])


def _dense_t_fwd(x, w_t, dtype):
    return dense_t(x, w_t, dtype), (x, w_t)


def _dense_t_bwd(dtype, res, dy):
    x, w_t = res
    xc = x.astype(dtype).reshape(-1, x.shape[-1])
    dy = dy.astype(dtype).reshape(-1, dy.shape[-1])
    dx = _dot(dy, w_t.astype(dtype), 1, 0)  # [m, out] x [out, in]
    dw_t = _dot(real_transpose(dy), xc, 1, 0)  # [out, m] x [m, in]
    return dx.astype(x.dtype).reshape(x.shape), dw_t.astype(w_t.dtype)


dense_t.defvjp(_dense_t_fwd, _dense_t_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def frozen_linear(node, x, dtype):
    """`x W` for a frozen stored-compressed weight node (int8/int4/fp8, NF4/FP4).

    The node supplies two matmuls over 2-D operands, both building their weight from its codes
    inside the op: `node.forward_matmul(x [m, in], dtype) -> [m, out]` and
    `node.input_gradient(dy [m, out], dtype) -> [m, in]` (float32 results). Here they are tied
    to their operand: the weight is built only after the layer's input exists in the forward
    pass, and after the layer's output cotangent exists in the backward pass, and it is never
    a residual. Why: in a sampling `while_loop` the weight is loop-invariant, so XLA would hoist
    every layer's dequantization out of the loop and carry a float copy of every weight; and in
    the backward pass of a train step, whose residual inputs all exist from the start, it
    dequantized every layer's weight up front, holding them all at once at the memory peak
    (QLoRA's step then needed more scratch memory than bf16 LoRA's). The frozen codes and
    scales get no gradient (the returned cotangent for the node is zero); x does.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = _few_rows(_tied(node, x2).forward_matmul, x2.astype(dtype), dtype)
    return y.astype(dtype).reshape(*x.shape[:-1], y.shape[-1])


def _few_rows(matmul, a, dtype):
    """`matmul(a, dtype)` with fewer than 8 rows padded to 8 (and the padding dropped again).

    XLA's CPU dot runs a product with a single row (a decode step at batch 1) through a
    matrix-vector path up to 8x slower than the same weight with 8 rows (measured: 26.8 vs 4.3
    ms for a [512, 32000] bf16 head, 17.1 vs 2.2 ms for [2048, 5632]); the extra zero rows
    cost nothing next to reading the weight.
    """
    m = a.shape[0]
    if m >= 8:
        return matmul(a, dtype)
    return matmul(jnp.pad(a, ((0, 8 - m), (0, 0))), dtype)[:m]


def _tied(node, arr):
    """`node` made to depend on `arr`, values unchanged.

    An `optimization_barrier` keeps loop-invariant code motion from hoisting the
    dequantization out of a sampling loop, but XLA's CPU pipeline expands barriers before it
    schedules, so on its own it orders nothing: the backward pass then dequantized every layer
    at its start. A real data dependency does order it: a zero made from one element of `arr`
    (exactly zero for any value, NaN and inf included) is added to the node's float leaves.
    """
    node, arr = lax.optimization_barrier((node, arr))
    probe = arr.reshape(-1)[0].astype(F32) * 0.0
    zero = jnp.where(jnp.isnan(probe), 0.0, probe)
    return jax.tree.map(
        lambda leaf: leaf + zero.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.inexact)
        else leaf, node)


def _frozen_linear_fwd(node, x, dtype):
    return frozen_linear(node, x, dtype), (node, x)


def _frozen_linear_bwd(dtype, res, dy):
    node, x = res
    dy2 = dy.reshape(-1, dy.shape[-1]).astype(dtype)
    dx = _few_rows(_tied(node, dy2).input_gradient, dy2, dtype)
    zero = jax.tree.map(_zero_cotangent, node)
    return zero, dx.astype(x.dtype).reshape(x.shape)


def _zero_cotangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


frozen_linear.defvjp(_frozen_linear_fwd, _frozen_linear_bwd)


def dot_nt(a, b):
    """`a b^T` for a [m, k], b [n, k] with float32 accumulation: both operands contract their
    last dimension (a fast layout for XLA's CPU dot; a weight stored [out, in] needs it)."""
    return _dot(a, b, 1, 1)


def dot_nn(a, b):
    """`a b` for a [m, k], b [k, n] with float32 accumulation."""
    return _dot(a, b, 1, 0)


def weight_gradient(x, dy):
    """`x^T dy` [in, out] for x [m, in], dy [m, out], transposing the smaller operand.

    One operand has to be laid out row-major transposed for the fast dot. For a LoRA A matrix
    (out = rank) transposing x copies the whole activation, and XLA fuses the activation's own
    producer (e.g. SwiGLU's silu * up) into that strided copy, which costs ten times the dot;
    computing `(dy^T x)^T` moves only [m, rank] and [rank, in] instead.
    """
    if dy.shape[-1] < x.shape[-1]:
        return real_transpose(_dot(real_transpose(dy), x, 1, 0))  # ([out, m] x [m, in])^T
    return _dot(real_transpose(x), dy, 1, 0)  # [in, m] x [m, out]


def linear(x, w, dtype=F32, rng=None):
    """The one matmul entry point: `x @ w` for arrays, the node's own rule for weight nodes.

    `rng` (a key, or None when deterministic) reaches nodes that draw randomness in training,
    such as LoRA dropout; plain arrays ignore it. Keys are passed, never stored in the params.
    """
    if is_weight_node(w):
        return w.linear(x, dtype, rng)
    return dense(x, w, dtype)


def computed_once(fn, *args):
    """`fn(*args)`, evaluated as its own computation whose outputs are materialized once.

    Why: XLA fuses an elementwise producer into each consumer and, when a consumer broadcasts
    it, evaluates it per consumer element. For the rotary tables that meant a cosine and a sine
    per head, in every layer's forward and backward: 16 rotations' forward and backward took
    330 ms instead of 80 on the 2-core CPU. Optimization barriers are expanded before fusion,
    so the boundary is a conditional whose two branches are both `fn`: the result does not
    depend on the (runtime) predicate, and XLA cannot fuse across it.
    """
    first = jnp.ravel(jax.tree.leaves(args)[0])[0]
    return lax.cond(first == 0, fn, fn, *args)


def fold_key(rng, i: int):
    """`fold_in(rng, i)`, or None when there is no key: one distinct key per call site."""
    return None if rng is None else jax.random.fold_in(rng, i)


def embed(ids, table, dtype=F32):
    """The one lookup entry point: rows of the [vocab, dim] table (or the node's rule)."""
    if is_weight_node(table):
        return table.embed(ids, dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def materialize(w):
    """The plain array a weight (array or node) stands for; used where a kernel needs it whole."""
    if is_weight_node(w):
        return w.materialize()
    return w


# ----------------------------------------------------------------------------- attention

_NEG = -1e30


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_attention(q, k, v, mask, scale):
    """Softmax attention in the layout the fast dots want.

    q [b, m, d] with m = group * queries (grouped heads sharing one KV head stacked along m),
    k and v [b, d, t] (keys and values transposed so every dot, forward and backward, contracts
    the left operand's last dim), mask bool [batch, s, t] with b = batch * kv_heads and
    m = groups * s: one mask row per query position serves every head. Returns [b, m, d].
    """
    out, _ = _attention_fwd(q, k, v, mask, scale)
    return out


def _attention_probs(q, k, mask, scale):
    s = _dot(q, k, 2, 1, batch=1) * scale  # [b, m, t]
    batch, n_q, t = mask.shape
    s = s.reshape(batch, -1, n_q, t)  # [batch, kv_heads * groups, s, t]
    s = jnp.where(mask[:, None], s, _NEG)
    s = s - jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    return p.reshape(q.shape[0], q.shape[1], t)


def _attention_fwd(q, k, v, mask, scale):
    p = _attention_probs(q, k, mask, scale).astype(q.dtype)
    out = _dot(p, v, 2, 2, batch=1).astype(q.dtype)  # [b, m, t] x [b, d, t] -> [b, m, d]
    return out, (q, k, v, p)


def _attention_bwd(scale, res, dout):
    q, k, v, p = res
    dout = dout.astype(q.dtype)
    dp = _dot(dout, v, 2, 1, batch=1)  # [b, m, d] x [b, d, t] -> [b, m, t]
    pf = p.astype(F32)
    ds = pf * (dp - jnp.sum(dp * pf, axis=-1, keepdims=True)) * scale
    ds = ds.astype(q.dtype)
    dq = _dot(ds, k, 2, 2, batch=1)  # [b, m, t] x [b, d, t] -> [b, m, d]
    dk = _dot(real_transpose(q), ds, 2, 1, batch=1)  # [b, d, m] x [b, m, t] -> [b, d, t]
    dv = _dot(real_transpose(dout), p, 2, 1, batch=1)  # [b, d, m] x [b, m, t] -> [b, d, t]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


grouped_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- cross-entropy


def _ce_chunk(h, w, labels, weights, head_is_vocab_major):
    if head_is_vocab_major:  # tied embedding table [vocab, dim]
        logits = _dot(h, w, 1, 1)
    else:  # lm_head kernel [dim, vocab]
        logits = _dot(h, w, 1, 0)
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    nll = lse - label_logit
    # "The label has the highest logit", from the max the logsumexp needs anyway: an argmax is
    # a second, variadic reduction over the whole vocabulary that XLA's CPU backend runs slowly
    # (a quarter of the loss's time on llama-56m). Exact ties, if any, count as correct.
    correct = (label_logit >= top).astype(F32)
    return logits, lse, nll, jnp.sum(correct * weights)


def _ce_chunks(n: int, chunk: int):
    chunk = min(chunk, n)
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_cross_entropy(h, w, labels, weights, dtype, head_is_vocab_major=False, chunk=1024):
    """Weighted next-token NLL sum and correct-prediction count, never holding all logits.

    h [n, dim] final hidden states, w the output head ([dim, vocab], or the tied [vocab, dim]
    table when `head_is_vocab_major`), labels [n] int, weights [n] f32. Under differentiation
    the forward pass also computes d/dh and d/dw chunk by chunk (the softmax is at hand then),
    so the [n, vocab] f32 logits never exist at once and the backward pass is a multiply.
    """
    wc = w.astype(dtype)
    hc = h.astype(dtype)
    loss, correct = jnp.zeros((), F32), jnp.zeros((), F32)
    for s, e in _ce_chunks(h.shape[0], chunk):
        _, _, nll, c = _ce_chunk(hc[s:e], wc, labels[s:e], weights[s:e], head_is_vocab_major)
        loss, correct = loss + jnp.sum(nll * weights[s:e]), correct + c
    return loss, correct


def _ce_fwd(h, w, labels, weights, dtype, head_is_vocab_major, chunk):
    wc = w.astype(dtype)
    hc = h.astype(dtype)
    loss, correct = jnp.zeros((), F32), jnp.zeros((), F32)
    dh_parts, nll_parts = [], []
    dw_t = None  # accumulated in [dim, vocab] layout: h^T @ dlogits is the fast form
    for s, e in _ce_chunks(h.shape[0], chunk):
        logits, lse, nll, c = _ce_chunk(hc[s:e], wc, labels[s:e], weights[s:e], head_is_vocab_major)
        loss, correct = loss + jnp.sum(nll * weights[s:e]), correct + c
        nll_parts.append(nll)
        dlogits = jnp.exp(logits - lse[:, None])
        dlogits = dlogits - jax.nn.one_hot(labels[s:e], logits.shape[-1], dtype=F32)
        dlogits = (dlogits * weights[s:e, None]).astype(dtype)
        if head_is_vocab_major:
            dh_parts.append(_dot(dlogits, wc, 1, 0))  # [c, v] x [v, d]
        else:
            dh_parts.append(_dot(dlogits, wc, 1, 1))  # [c, v] x [d, v]
        part = _dot(real_transpose(hc[s:e]), dlogits, 1, 0)  # [d, c] x [c, v]
        dw_t = part if dw_t is None else dw_t + part
    dh = jnp.concatenate(dh_parts, axis=0).astype(h.dtype)
    dw = (real_transpose(dw_t) if head_is_vocab_major else dw_t).astype(w.dtype)
    nll = jnp.concatenate(nll_parts)
    return (loss, correct), (dh, dw, nll)


def _ce_bwd(dtype, head_is_vocab_major, chunk, res, cotangents):
    dh, dw, nll = res
    g = cotangents[0]  # the correct-count output is piecewise constant: no gradient
    return dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), None, nll * g


fused_cross_entropy.defvjp(_ce_fwd, _ce_bwd)

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

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from ptjax.sharding import per_shard
from ptjax.tree import is_weight_node

F32 = jnp.float32


_FORCE_PORTABLE = contextvars.ContextVar("ptjax_force_portable_kernels", default=False)


def kernel_backend() -> str:
    """The backend whose kernels to trace: `jax.default_backend()`, or "portable" inside
    `portable_kernels` (the blockwise kernels and plain layouts every backend can run)."""
    return "portable" if _FORCE_PORTABLE.get() else jax.default_backend()


def cpu_layouts() -> bool:
    """True when tracing for XLA's CPU backend, whose fast dot needs the row-major operand
    layouts this module materializes (`real_transpose`). GPU and TPU matmul libraries take a
    transposed operand as it is, so there the copy would only cost memory traffic."""
    return kernel_backend() == "cpu"


@contextlib.contextmanager
def portable_kernels():
    """Trace with the GPU/TPU layouts (no materialized transposes) on any backend; tests use it
    to run the accelerator path on CPU. Affects functions traced inside the block only: JAX
    caches a function's trace whatever the context, so pass a fresh function."""
    token = _FORCE_PORTABLE.set(True)
    try:
        yield
    finally:
        _FORCE_PORTABLE.reset(token)


def _dot(a, b, contract_a: int, contract_b: int, batch: int = 0):
    """dot_general with `batch` leading batch dims and f32 accumulation."""
    dims = (((contract_a,), (contract_b,)), (tuple(range(batch)), tuple(range(batch))))
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def real_transpose(a):
    """Swap the last two axes with a copy XLA cannot fold into the consuming dot.

    A plain transpose feeding a dot is folded into the dot's dimension numbers, which is exactly
    the slow layout we are avoiding. Splitting an axis first turns it into a rank-changing
    reshape/transpose/reshape that XLA materializes as a row-major copy. Off CPU it is a plain
    transpose (`cpu_layouts`).
    """
    *lead, m, n = a.shape
    if n % 2 == 0 and cpu_layouts():
        b = a.reshape(*lead, m, 2, n // 2)
        b = jnp.moveaxis(b, -3, -1)  # [..., 2, n/2, m]
        return b.reshape(*lead, n, m)
    return jnp.swapaxes(a, -1, -2)


# ----------------------------------------------------------------------------- dense


def keep(tree):
    """Residuals for a backward pass, with bfloat16 leaves stored as uint16 bit patterns on CPU
    (`unkeep` restores them).

    Why: under `lax.scan` over layers every residual is written into a [layers, ...] stack by
    a dynamic-update-slice, which XLA's CPU backend does not run in bfloat16: it converts the
    stack to float32 and back around every write, so a scanned llama-56m step held 875 MB
    more scratch memory and ran 20% slower than the unrolled loop. Integer stacks it updates
    in place.
    """
    if not cpu_layouts():
        return tree
    return jax.tree.map(
        lambda x: lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x,
        tree)


def unkeep(tree):
    """`keep`'s inverse (uint16 leaves back to bfloat16; ptjax keeps no other uint16 arrays)."""
    return jax.tree.map(
        lambda x: lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x,
        tree)


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
    return dense(x, w, dtype), (keep(x), w)


def _dense_bwd(dtype, res, dy):
    x, w = unkeep(res[0]), res[1]
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
    return dense_t(x, w_t, dtype), (keep(x), w_t)


def _dense_t_bwd(dtype, res, dy):
    x, w_t = unkeep(res[0]), res[1]
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
    return frozen_linear(node, x, dtype), keep((node, x))


def _frozen_linear_bwd(dtype, res, dy):
    node, x = unkeep(res)
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


@jax.custom_vjp
def swiglu(gate, up):
    """`silu(gate) * up` computed in float32, returned in gate's dtype.

    A custom VJP so the backward pass keeps gate and up as they are (bfloat16): autodiff kept
    their float32 casts, [tokens, mlp] float32 twice per layer, the largest residuals of a
    llama-56m step.
    """
    g, u = gate.astype(F32), up.astype(F32)
    return (jax.nn.silu(g) * u).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), keep((gate, up))


def _swiglu_bwd(res, dy):
    gate, up = unkeep(res)
    g, u, dy = gate.astype(F32), up.astype(F32), dy.astype(F32)
    sig = jax.nn.sigmoid(g)
    d_up = dy * g * sig
    d_gate = dy * u * sig * (1.0 + g * (1.0 - sig))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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
    return out, keep((q, k, v, p))


def _attention_bwd(scale, res, dout):
    q, k, v, p = unkeep(res)
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


KEY_BLOCK = 512  # keys per step of `blockwise_attention`'s loop


def attention(q, k, v, mask, scale):
    """Softmax attention in `grouped_attention`'s layout, choosing the kernel by key count.

    Up to `2 * KEY_BLOCK` keys the whole probability matrix is one fused step and is kept for
    the backward pass (fastest on CPU for short sequences); beyond it `blockwise_attention`
    keeps only the output and one logsumexp per query row, so the residuals of a layer are
    linear in the sequence length on every backend.
    """
    if k.shape[-1] <= 2 * KEY_BLOCK:
        return grouped_attention(q, k, v, mask, scale)
    return blockwise_attention(q, k, v, mask, scale, KEY_BLOCK)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise_attention(q, k, v, mask, scale, block=KEY_BLOCK):
    """Flash-style attention: `grouped_attention`'s result, keys visited `block` at a time.

    Same layout and mask as `grouped_attention` (q [b, m, d], k and v [b, d, t], mask bool
    [batch, s, t]). The forward pass runs an online softmax over key blocks in a `lax.scan`
    (running max, normalizer and output per query row); the backward pass recomputes each
    block's probabilities from the saved logsumexp. Residuals: q, k, v, the output and
    [b, m] logsumexps, never a [m, t] matrix. A query row with no visible key (padding)
    returns zeros.
    """
    out, _ = _blockwise_fwd(q, k, v, mask, scale, block)
    return out


def _key_blocks(k, v, mask, block):
    """k, v [b, d, t] and mask [batch, s, t] padded to whole blocks (padding masked) and split
    into [n_blocks, ...] scan inputs."""
    t = k.shape[-1]
    pad = -t % block
    if pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
    n = (t + pad) // block

    def split(x):
        return jnp.moveaxis(x.reshape(*x.shape[:-1], n, block), -2, 0)

    return split(k), split(v), split(mask)


def _block_scores(q, k_blk, mask_blk, scale):
    """Masked scaled scores [b, m, block] (masked entries -inf)."""
    s = _dot(q, k_blk, 2, 1, batch=1) * scale
    batch, n_q, block = mask_blk.shape
    s = s.reshape(batch, -1, n_q, block)
    s = jnp.where(mask_blk[:, None], s, -jnp.inf)
    return s.reshape(q.shape[0], q.shape[1], block)


def _blockwise_fwd(q, k, v, mask, scale, block):
    b, m, d = q.shape
    k_blocks, v_blocks, mask_blocks = _key_blocks(k, v, mask, block)

    def step(carry, xs):
        row_max, norm, acc = carry
        k_blk, v_blk, mask_blk = xs
        s = _block_scores(q, k_blk, mask_blk, scale)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))  # finite: starts at _NEG
        p = jnp.exp(s - new_max[..., None])
        rescale = jnp.exp(row_max - new_max)
        norm = norm * rescale + jnp.sum(p, axis=-1)
        acc = acc * rescale[..., None] + _dot(p.astype(q.dtype), v_blk, 2, 2, batch=1)
        return (new_max, norm, acc), None

    init = (jnp.full((b, m), _NEG, F32), jnp.zeros((b, m), F32), jnp.zeros((b, m, d), F32))
    (row_max, norm, acc), _ = lax.scan(step, init, (k_blocks, v_blocks, mask_blocks))
    seen = norm > 0
    out = (acc / jnp.where(seen, norm, 1.0)[..., None]).astype(q.dtype)
    lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, norm, 1.0)), 0.0)
    return out, keep((q, k, v, mask, out, lse))


def _blockwise_bwd(scale, block, res, dout):
    q, k, v, mask, out, lse = unkeep(res)
    t = k.shape[-1]
    dout = dout.astype(q.dtype)
    k_blocks, v_blocks, mask_blocks = _key_blocks(k, v, mask, block)
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1)  # [b, m]: rowsum(dP * P)
    q_t = real_transpose(q)  # [b, d, m], once for every block's dk
    dout_t = real_transpose(dout)

    def step(dq, xs):
        k_blk, v_blk, mask_blk = xs
        p = jnp.exp(_block_scores(q, k_blk, mask_blk, scale) - lse[..., None])
        dp = _dot(dout, v_blk, 2, 1, batch=1)  # [b, m, d] x [b, d, n] -> [b, m, n]
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + _dot(ds, k_blk, 2, 2, batch=1)  # [b, m, n] x [b, d, n] -> [b, m, d]
        dk = _dot(q_t, ds, 2, 1, batch=1)  # [b, d, m] x [b, m, n] -> [b, d, n]
        dv = _dot(dout_t, p.astype(q.dtype), 2, 1, batch=1)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = lax.scan(step, jnp.zeros(q.shape, F32), (k_blocks, v_blocks, mask_blocks))

    def join(x):  # [n, b, d, block] -> [b, d, t]
        return jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], -1)[..., :t]

    return dq.astype(q.dtype), join(dk), join(dv), None


blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def cudnn_attention_applies(dtype, head_dim: int) -> bool:
    """True when `fused_attention` should run: tracing for a GPU (and not under
    `portable_kernels`), half-precision compute, and a head size cuDNN's flash kernel takes."""
    return (kernel_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)


def fused_attention(q, k, v, mask, scale, implementation="cudnn"):
    """Attention through `jax.nn.dot_product_attention` (cuDNN's flash kernel on GPU).

    q [b, s, heads, d], k and v [b, t, kv_heads, d] (grouped heads read their KV head), mask
    bool [b, s, t] (segments, causality and prefix keys as `llama.attention_mask` builds it).
    Returns [b, s, heads, d]. cuDNN keeps only the output and a logsumexp per query row for
    the backward pass, so residuals are linear in the sequence length. A query row that sees
    no key (padding) returns zeros, as the CPU kernels do. `implementation="xla"` runs the same
    call on any backend (the tests compare it with the CPU kernels). Returns None, with a
    warning, when cuDNN refuses the call while tracing (a cuDNN too old, a shape it lacks): the
    caller then runs its portable kernels.
    """
    seen = mask.any(-1, keepdims=True)  # [b, s, 1]
    visible = mask | ~seen  # a padding row attends to every key (no 0/0); its output is zeroed
    try:
        out = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], scale=scale,
                                           implementation=implementation)
    except (ValueError, NotImplementedError, RuntimeError) as err:
        logging.warning("cuDNN attention refused (%s); using the portable kernels", err)
        return None
    return jnp.where(seen[..., None], out, 0).astype(q.dtype)


def splash_attention_applies() -> bool:
    """True when `splash_attention` should run: tracing for a TPU (not under
    `portable_kernels`)."""
    return kernel_backend() == "tpu"


def splash_attention(q, k, v, segment_ids, scale, interpret=False):
    """Causal attention within segments through JAX's Pallas splash-attention kernel (TPU).

    q [b, s, heads, d], k and v [b, s, kv_heads, d], segment_ids [b, s] int (0 = padding, as
    `llama.attention_mask` reads them): query i sees key j <= i of its own segment, which is
    the model's mask when there are no prefix keys. The kernel keeps a logsumexp per query row
    for the backward pass, so residuals are linear in the sequence length. The sequence is
    padded to a multiple of 128 with a segment of its own; padding rows return zeros, as the
    other kernels do. `interpret=True` runs the kernel's Pallas code on any backend (the tests
    compare it with the CPU kernels). Returns None, with a warning, when the kernel refuses the
    shapes while tracing: the caller then runs its portable kernels.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    pad = -s % 128
    seg = segment_ids.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    n = s + pad
    block = next(size for size in (512, 256, 128) if n % size == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    groups = heads // kv_heads
    try:
        kernel = sk.make_splash_mqa_single_device(
            sm.MultiHeadMask([sm.CausalMask((n, n))] * groups), block_sizes=sizes,
            interpret=interpret)
    except (ValueError, NotImplementedError) as err:
        logging.warning("splash attention refused (%s); using the portable kernels", err)
        return None

    def attend(q, k, v, seg):  # [b, kv, g, n, d] and [b, kv, n, d] (a device's block of them)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # one MQA call per KV head
        return jax.vmap(lambda q, k, v, ids: per_head(q, k, v, sk.SegmentIds(q=ids, kv=ids)))(
            q, k, v, seg)

    qg = (q * scale).reshape(b, n, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
    out = per_shard(attend, (qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg),
                    (("batch", "kv", None, "length", None), ("batch", "kv", "length", None),
                     ("batch", "kv", "length", None), ("batch", "length")),
                    ("batch", "kv", None, "length", None))
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, n, heads, d)[:, :s]
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


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


def _ce_rows(h, labels, weights, chunk: int):
    """The rows split into `n_chunks` scan steps of `rows` rows: [n_chunks, rows, ...] views.

    Step j takes rows j, j + n_chunks, j + 2 n_chunks, ... (a reshape to [rows, n_chunks] and
    a swap), so a row axis split over devices stays split inside every step rather than each
    step living on one device. Rows padded to a whole number of steps carry weight 0.
    """
    n = h.shape[0]
    n_chunks = -(-n // chunk)
    rows = -(-n // n_chunks)
    pad = rows * n_chunks - n
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad))
        weights = jnp.pad(weights, (0, pad))

    def split(x):
        return jnp.swapaxes(x.reshape(rows, n_chunks, *x.shape[1:]), 0, 1)

    return split(h), split(labels), split(weights)


def _ce_unsplit(x, n: int):
    """Inverse of `_ce_rows` for a per-row result [n_chunks, rows, ...] -> [n, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_cross_entropy(h, w, labels, weights, dtype, head_is_vocab_major=False, chunk=1024):
    """Weighted next-token NLL sum and correct-prediction count, never holding all logits.

    h [n, dim] final hidden states, w the output head ([dim, vocab], or the tied [vocab, dim]
    table when `head_is_vocab_major`), labels [n] int, weights [n] f32. Under differentiation
    the forward pass also computes d/dh and d/dw chunk by chunk (the softmax is at hand then),
    so the [n, vocab] f32 logits never exist at once and the backward pass is a multiply.
    The chunks are the steps of a `lax.scan`, so XLA cannot unroll them into buffers that are
    all live at once.
    """
    (loss, correct), _ = _ce_fwd(h, w, labels, weights, dtype, head_is_vocab_major, chunk,
                                 with_gradients=False)
    return loss, correct


def _ce_fwd(h, w, labels, weights, dtype, head_is_vocab_major, chunk, with_gradients=True):
    wc = w.astype(dtype)
    n, dim = h.shape
    h_steps, label_steps, weight_steps = _ce_rows(h.astype(dtype), labels, weights, chunk)

    def step(carry, xs):
        loss, correct, dw_t = carry
        hc, lab, wt = xs
        logits, lse, nll, c = _ce_chunk(hc, wc, lab, wt, head_is_vocab_major)
        loss, correct = loss + jnp.sum(nll * wt), correct + c
        if not with_gradients:
            return (loss, correct, dw_t), None
        dlogits = jnp.exp(logits - lse[:, None])
        dlogits = dlogits - jax.nn.one_hot(lab, logits.shape[-1], dtype=F32)
        dlogits = (dlogits * wt[:, None]).astype(dtype)
        if head_is_vocab_major:
            dh = _dot(dlogits, wc, 1, 0)  # [c, v] x [v, d]
        else:
            dh = _dot(dlogits, wc, 1, 1)  # [c, v] x [d, v]
        # accumulated in [dim, vocab] layout: h^T @ dlogits is the fast form
        dw_t = dw_t + _dot(real_transpose(hc), dlogits, 1, 0)  # [d, c] x [c, v]
        return (loss, correct, dw_t), (dh.astype(h.dtype), nll)

    vocab = w.shape[0] if head_is_vocab_major else w.shape[1]
    dw_init = jnp.zeros((dim, vocab) if with_gradients else (), F32)
    init = (jnp.zeros((), F32), jnp.zeros((), F32), dw_init)
    (loss, correct, dw_t), per_row = lax.scan(step, init, (h_steps, label_steps, weight_steps))
    if not with_gradients:
        return (loss, correct), None
    dh, nll = (_ce_unsplit(x, n) for x in per_row)
    dw = (real_transpose(dw_t) if head_is_vocab_major else dw_t).astype(w.dtype)
    return (loss, correct), (dh, dw, nll)


def _ce_bwd(dtype, head_is_vocab_major, chunk, res, cotangents):
    dh, dw, nll = res
    g = cotangents[0]  # the correct-count output is piecewise constant: no gradient
    return dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), None, nll * g


fused_cross_entropy.defvjp(_ce_fwd, _ce_bwd)

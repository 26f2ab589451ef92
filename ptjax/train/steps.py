"""The optimizer-step skeleton the preference and RL train steps share.

`sft.train_step` sums token losses itself (its mean is over all loss tokens of a batch); the
objectives here are means over examples (pairs, rollouts), so equal microbatches average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ptjax import ops
from ptjax import tree as ptree
from ptjax.train.guard import keep_if_finite


def microbatches(batch, n: int):
    """`batch` with every array's leading axis split into `n` equal microbatches."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches "
                             "(train.grad_accum)")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def mean_loss_update(state, batch, rng, loss_fn, tx: optax.GradientTransformation,
                     grad_accum: int = 1):
    """One optimizer step on the mean of `loss_fn` over `grad_accum` equal microbatches.

    `loss_fn(params, microbatch, key) -> (loss, metrics)` sees the merged params (trainable and
    frozen halves); gradients reach `state.trainable` only. Metrics are averaged over
    microbatches, and `grad_norm` is added. Microbatch i draws its randomness from
    `fold_in(rng, i)`. A step with a non-finite loss or gradient norm keeps the old params and
    optimizer state (`guard.keep_if_finite`).
    """
    def loss_of(trainable, mb, key):
        return loss_fn(ptree.merge(trainable, state.frozen), mb, key)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(state.trainable, batch, ops.fold_key(rng, 0))
    else:
        def accumulate(carry, xs):
            mb, index = xs
            (loss, metrics), grads = grad_fn(state.trainable, mb, ops.fold_key(rng, index))
            return jax.tree.map(jnp.add, carry, (grads, loss, metrics)), None

        zero_metrics = jax.eval_shape(lambda: grad_fn(state.trainable, jax.tree.map(
            lambda x: x[0], microbatches(batch, grad_accum)), ops.fold_key(rng, 0))[0][1])
        init = (jax.tree.map(jnp.zeros_like, state.trainable), jnp.zeros(()),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
        (grads, loss, metrics), _ = jax.lax.scan(
            accumulate, init, (microbatches(batch, grad_accum), jnp.arange(grad_accum)))
        grads, loss, metrics = jax.tree.map(lambda x: x / grad_accum, (grads, loss, metrics))
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
    return keep_if_finite(state, state.replace(step=state.step + 1, trainable=trainable,
                                               opt_state=opt_state), metrics)

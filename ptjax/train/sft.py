"""Supervised fine-tuning (and plain language-model pretraining) train and eval steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ptjax import ops
from ptjax import tree as ptree
from ptjax.train.guard import keep_if_finite
from ptjax.train.losses import next_token_nll
from ptjax.train.state import TrainState


def _microbatches(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state: TrainState, batch, rng, *, model_cfg, tx: optax.GradientTransformation,
               grad_accum: int = 1):
    """One optimizer step on `batch` ([batch, seq] arrays), accumulating `grad_accum` microbatches.

    Gradients are taken over `state.trainable` only. The loss is the mean NLL over all loss
    tokens of the whole batch, so accumulation is exactly the same update as one big batch.
    `rng` (a key, or None for no dropout) is the step's randomness; microbatch i draws from
    `fold_in(rng, i)`, so every microbatch of an accumulated step gets its own dropout masks.
    A step with a non-finite loss or gradient norm keeps the old params and optimizer state
    (`guard.keep_if_finite`).
    """
    def nll_sum(trainable, micro, key):
        params = ptree.merge(trainable, state.frozen)
        return next_token_nll(params, model_cfg, micro, rng=key)

    def grads_and_sums(mb, index):
        (loss, aux), grads = jax.value_and_grad(nll_sum, has_aux=True)(
            state.trainable, mb, ops.fold_key(rng, index))
        return grads, loss, aux["tokens"], aux["correct"]

    if grad_accum == 1:
        grads, loss, tokens, correct = grads_and_sums(batch, 0)
    else:
        def accumulate(carry, xs):
            mb, index = xs
            return jax.tree.map(jnp.add, carry, grads_and_sums(mb, index)), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (grads, loss, tokens, correct), _ = jax.lax.scan(
            accumulate, init, (_microbatches(batch, grad_accum), jnp.arange(grad_accum)))
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss / denom, "accuracy": correct / denom, "tokens": tokens,
               "grad_norm": optax.tree.norm(grads)}
    return keep_if_finite(state, state.replace(step=state.step + 1, trainable=trainable,
                                               opt_state=opt_state), metrics)


def eval_step(params, batch, *, model_cfg):
    """Summed NLL, loss-token count and correct next-token predictions of one eval batch."""
    loss, aux = next_token_nll(params, model_cfg, batch)
    return {"nll_sum": loss, "tokens": aux["tokens"], "correct": aux["correct"]}

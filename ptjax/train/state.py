"""The train state: trainable and frozen halves of the params, optimizer state, step, RNG."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ptjax import tree as ptree


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes, and everything a checkpoint must hold.

    `trainable` and `frozen` are the two halves of one parameter tree (`ptree.split`): gradients
    and optimizer state exist only for `trainable`.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array

    @property
    def params(self):
        """The whole parameter tree, halves merged back."""
        return ptree.merge(self.trainable, self.frozen)


def create(params, trainable_mask, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Split `params` by mask and build a fresh state (step 0, optimizer initialized)."""
    trainable, frozen = ptree.split(params, trainable_mask)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable),
                      rng=jax.random.key_data(jax.random.key(seed)))

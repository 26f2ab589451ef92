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


def create(params, trainable_mask, tx: optax.GradientTransformation, seed: int,
           frozen_matmul_dtype=None) -> TrainState:
    """Split `params` by mask and build a fresh state (step 0, optimizer initialized).

    With `frozen_matmul_dtype` (the compute dtype), frozen matrices are stored in it: they never
    update, the matmuls cast them to it anyway, so results are identical while the frozen base
    takes half the memory and no per-step cast (how adapter training keeps a 7B base small).
    Vectors (norm scales, biases) and the embedding table keep their dtype: the table is read by
    a lookup in float32, not by a matmul, so rounding it would change the model. So do the codes,
    scales and offsets of quantized weights (`tree.MATMUL_WEIGHTS` names what is cast).
    """
    trainable, frozen = ptree.split(params, trainable_mask)
    if frozen_matmul_dtype is not None:
        frozen = ptree.cast_matmul_weights(frozen, frozen_matmul_dtype)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable),
                      rng=jax.random.key_data(jax.random.key(seed)))

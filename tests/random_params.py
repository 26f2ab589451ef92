"""Random model parameters for sampling and decoding tests, drawn with numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.models import llama


def spread_params(cfg, seed=0, std=0.12):
    """Float32 params in the model's layout: matrices drawn from N(0, std), norm scales ones.

    Why numpy: jitting the threefry-heavy `init_params` costs ~10 s of compile on a busy CPU.
    Why 0.12, six times the model's init: attention is sharp and logits spread out, so greedy
    argmaxes are decided by clear margins (with 0.02, position or padding mistakes would barely
    move them, and float noise could flip them).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: llama.init_params(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape) if len(s.shape) == 2
                                              else np.ones(s.shape), jnp.float32), shapes)

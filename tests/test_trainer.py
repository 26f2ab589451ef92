"""The trainer's evaluation against a tiny case computed by hand.

A one-layer model whose blocks are zeroed passes each token's embedding straight to the head, so
its next-token distribution is a table we choose: from token i the successor (i + 1) % 8 has
probability 2/9 and every other token 1/9. Loss, perplexity and accuracy then follow on paper.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import data as D
from ptjax.models.config import ModelConfig
from ptjax.train import sft, trainer

V = 8
CFG = ModelConfig(vocab_size=V, hidden=V, mlp=V, layers=1, heads=2, kv_heads=1, head_dim=4,
                  norm_eps=1e-12)


def _params():
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    successor = np.zeros((V, V))
    successor[np.arange(V), (np.arange(V) + 1) % V] = math.log(2.0)
    return {
        # Row t is sqrt(V) e_t: RMS 1, so the final norm leaves it unchanged.
        "embed": {"embedding": jnp.sqrt(float(V)) * jnp.eye(V)},
        "layers_0": {
            "attn_norm": {"scale": jnp.ones(V)},
            "attn": {"q": {"kernel": zeros(V, 8)}, "k": {"kernel": zeros(V, 4)},
                     "v": {"kernel": zeros(V, 4)}, "o": {"kernel": zeros(8, V)}},
            "mlp_norm": {"scale": jnp.ones(V)},
            "mlp": {"gate": {"kernel": zeros(V, V)}, "up": {"kernel": zeros(V, V)},
                    "down": {"kernel": zeros(V, V)}},
        },
        "final_norm": {"scale": jnp.ones(V)},
        "lm_head": {"kernel": jnp.asarray(successor / math.sqrt(V), jnp.float32)},
    }


def test_evaluate_matches_hand_computation():
    # Example 1 predicts 2 (successor of 1), 3 (successor of 2) and 5 (not the successor of 3);
    # example 2 predicts 0 (successor of 7) and 1 (successor of 0); 6 -> 7 is not in the loss.
    ex1 = (np.array([1, 2, 3, 5], np.int32), np.array([0, 1, 1, 1], bool))
    ex2 = (np.array([6, 7, 0, 1], np.int32), np.array([0, 0, 1, 1], bool))
    batches = [D.pack([ex1], 6), D.pack([ex2], 6)]  # two batches: means must be token-weighted
    eval_fn = jax.jit(functools.partial(sft.eval_step, model_cfg=CFG))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = trainer.evaluate(eval_fn, _params(), batches, single)
    loss = (4 * math.log(9 / 2) + math.log(9)) / 5
    np.testing.assert_allclose(got["eval/loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(got["eval/perplexity"], math.exp(loss), rtol=1e-5)
    np.testing.assert_allclose(got["eval/accuracy"], 4 / 5, rtol=1e-6)

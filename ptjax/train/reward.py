"""Reward modeling: a scalar head on the last real token, trained on preference pairs.

The Bradley-Terry objective (InstructGPT): `-log sigmoid(r(prompt, chosen) - r(prompt,
rejected))`, optionally with a margin and reward centering (`rl_math.bradley_terry_loss`).
Both sides of a batch run through the body in one forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax.models import heads
from ptjax.train import rl_math
from ptjax.train.steps import mean_loss_update

HEAD = "score_head"


def scores(params, cfg, tokens, mask, rng=None):
    """Float32 [b] rewards: the head at each row's last real token."""
    return heads.head_outputs(params, cfg, tokens, jnp.asarray(mask).astype(jnp.int32),
                              name=HEAD, rng=rng)[:, 0]


def pair_scores(params, cfg, batch, rng=None):
    """(chosen rewards [b], rejected rewards [b]) of a `data.pairs` batch, in one forward."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    r = scores(params, cfg, tokens, mask, rng)
    return jnp.split(r, 2)


def train_step(state, batch, rng, *, model_cfg, tx, grad_accum: int = 1,
               center_coef: float = 0.0):
    """One Bradley-Terry step; metrics: loss, pairwise accuracy, mean chosen/rejected reward."""
    def loss_fn(params, mb, key):
        chosen, rejected = pair_scores(params, model_cfg, mb, key)
        return rl_math.bradley_terry_loss(chosen, rejected, center_coef=center_coef)

    return mean_loss_update(state, batch, rng, loss_fn, tx, grad_accum)


def eval_step(params, batch, *, model_cfg):
    """Sums over the real pairs of a batch: pairs, correct (r_chosen > r_rejected, strict),
    loss and margin (r_chosen - r_rejected)."""
    chosen, rejected = pair_scores(params, model_cfg, batch)
    w = batch["weight"]
    diff = chosen - rejected
    return {"pairs": jnp.sum(w), "correct": jnp.sum(w * (diff > 0)),
            "loss": jnp.sum(w * -jax.nn.log_sigmoid(diff)), "margin": jnp.sum(w * diff)}


def summarize(sums) -> dict:
    """Held-out pairwise accuracy, loss and mean margin from `eval_step` sums."""
    n = max(float(sums["pairs"]), 1.0)
    return {"eval/pairwise_accuracy": float(sums["correct"]) / n,
            "eval/loss": float(sums["loss"]) / n, "eval/margin": float(sums["margin"]) / n}

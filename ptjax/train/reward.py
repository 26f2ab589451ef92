"""Reward modeling: a scalar head on the last real token, trained on preference pairs.

The Bradley-Terry objective (InstructGPT): `-log sigmoid(r(prompt, chosen) - r(prompt,
rejected))`, optionally with a margin and reward centering (`rl_math.bradley_terry_loss`).
Both sides of a batch run through the body in one forward pass.

Optionally (`reward.likelihood`) the score adds `s * log p(response | prompt)` under the body's
own LM head, with the scale `s` a trained parameter of the head (`score_head/likelihood_scale`,
starting at 1): the reference-free implicit reward of SimPO-style objectives beside the
explicit head. Why: a small body's last hidden state has to learn, through attention, whether
each response token is the one the context predicts, which its LM head already scores token
by token; on the demo's tasks the head alone ranked right against wrong sums at chance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax.models import heads
from ptjax.train import policy, rl_math
from ptjax.train.steps import mean_loss_update

HEAD = "score_head"
LIKELIHOOD = "likelihood_scale"  # present in the head when the score has the likelihood term
F32 = jnp.float32


def scores(params, cfg, tokens, mask, response=None, rng=None):
    """Float32 [b] rewards: the head at each row's last real token, plus (when the head has a
    `likelihood_scale`) that scale times the summed log-probs of the `response` tokens
    ([b, s] mask of the response, EOS included) given what precedes them."""
    mask = jnp.asarray(mask).astype(jnp.int32)
    head = params[HEAD]
    if LIKELIHOOD not in head:
        return heads.head_outputs(params, cfg, tokens, mask, name=HEAD, rng=rng)[:, 0]
    if response is None:
        raise ValueError("this reward model scores the response's likelihood too "
                         f"({HEAD}/{LIKELIHOOD}): pass the response mask")
    h = policy.hidden(params, cfg, tokens, mask, rng)
    r = heads.head_at_last_token(head, h, mask)[:, 0]
    logp, _ = policy.shifted_logprobs(params, cfg, h, tokens, 1.0)
    return r + head[LIKELIHOOD][0] * jnp.sum(logp * jnp.asarray(response, F32), axis=1)


def add_likelihood_scale(params):
    """`params` with the head's likelihood scale added at 1 (see the module docstring)."""
    return {**params, HEAD: {**params[HEAD], LIKELIHOOD: jnp.ones((1,), F32)}}


def pair_scores(params, cfg, batch, rng=None):
    """(chosen rewards [b], rejected rewards [b]) of a `data.pairs` batch, in one forward."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    response = jnp.concatenate([batch["chosen_response"], batch["rejected_response"]])
    r = scores(params, cfg, tokens, mask, response, rng)
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

"""Direct preference optimization (DPO, and IPO) on preference pairs, as jitted pure steps.

The policy's sequence log-probs of the chosen and rejected responses (prompt tokens excluded)
are compared with the reference's (`rl_math.dpo_loss`). The reference is either the policy with
its adapters switched off (LoRA, DoRA, IA3, adapters: the same base arrays, computed in the
step without gradient) or log-probs precomputed once from the initial model before training
(`ref_chosen_logps` / `ref_rejected_logps` in the batch: any method, and no second model in
memory while training). IPO uses length-averaged log-probs, as its paper defines it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax.train import policy, rl_math
from ptjax.train.steps import mean_loss_update

REFERENCES = ("adapters_off", "precomputed")


def pair_logps(params, cfg, batch, *, average: bool, rng=None):
    """(chosen [b], rejected [b]) sequence log-probs over the response tokens, in one forward."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    response = jnp.concatenate([batch["chosen_response"], batch["rejected_response"]])
    lp = policy.token_logprobs(params, cfg, tokens, mask, rng=rng)
    return jnp.split(rl_math.sequence_logps(lp, response, average=average), 2)


def reference_logps(params, cfg, batch, reference: str, *, average: bool):
    """The reference's (chosen, rejected) sequence log-probs for `batch` (no gradient)."""
    if reference == "precomputed":
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    if reference != "adapters_off":
        raise ValueError(f"dpo.reference: {reference!r} is not one of {REFERENCES}")
    ref = jax.lax.stop_gradient(policy.adapters_off(params))
    return pair_logps(ref, cfg, batch, average=average)


def loss_and_stats(params, cfg, batch, rng=None, *, beta: float, loss_type: str,
                   label_smoothing: float, reference: str):
    """DPO/IPO loss of a batch of pairs and its statistics (implicit rewards, accuracy)."""
    average = loss_type == "ipo"
    chosen, rejected = pair_logps(params, cfg, batch, average=average, rng=rng)
    ref_chosen, ref_rejected = reference_logps(params, cfg, batch, reference, average=average)
    return rl_math.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type,
                            label_smoothing)


def train_step(state, batch, rng, *, model_cfg, tx, grad_accum: int = 1, beta: float = 0.1,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               reference: str = "adapters_off"):
    """One DPO optimizer step; metrics: loss, implicit chosen/rejected rewards, reward accuracy
    and margin."""
    def loss_fn(params, mb, key):
        return loss_and_stats(params, model_cfg, mb, key, beta=beta, loss_type=loss_type,
                              label_smoothing=label_smoothing, reference=reference)

    return mean_loss_update(state, batch, rng, loss_fn, tx, grad_accum)


def eval_step(params, batch, *, model_cfg, beta: float = 0.1, loss_type: str = "sigmoid",
              reference: str = "adapters_off"):
    """Sums over a batch's real pairs: pairs, loss, correct (implicit reward of chosen above
    rejected) and margin."""
    average = loss_type == "ipo"
    chosen, rejected = pair_logps(params, model_cfg, batch, average=average)
    ref_chosen, ref_rejected = reference_logps(params, model_cfg, batch, reference,
                                               average=average)
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    if loss_type == "ipo":
        losses = (margin / beta - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -jax.nn.log_sigmoid(margin)
    w = batch["weight"]
    return {"pairs": jnp.sum(w), "loss": jnp.sum(w * losses), "correct": jnp.sum(w * (margin > 0)),
            "margin": jnp.sum(w * margin)}


def summarize(sums) -> dict:
    """Held-out DPO loss, reward accuracy and mean implicit-reward margin."""
    n = max(float(sums["pairs"]), 1.0)
    return {"eval/loss": float(sums["loss"]) / n,
            "eval/reward_accuracy": float(sums["correct"]) / n,
            "eval/reward_margin": float(sums["margin"]) / n}

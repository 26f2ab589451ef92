"""GRPO and RLOO: policy-gradient steps with group baselines instead of a value function.

Each prompt is sampled G times; the G rewards of a group give every completion an advantage
relative to its siblings (`rl_math.grpo_advantages`: standardized, or only centered as in
Dr. GRPO; `rl_math.rloo_advantages`: minus the mean of the other G-1). The loss is GRPO's
clipped ratio averaged per token within a sequence and then over sequences, with an optional
k3 KL to the reference (the policy with adapters off, or a frozen copy).
"""

from __future__ import annotations

from ptjax.train import policy, rl_math
from ptjax.train.steps import mean_loss_update

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards, group_size: int, estimator: str):
    """[batch] advantages of rewards laid out in consecutive groups of `group_size`."""
    if estimator == "rloo":
        return rl_math.rloo_advantages(rewards, group_size)
    if estimator not in ESTIMATORS:
        raise ValueError(f"grpo.estimator: {estimator!r} is not one of {ESTIMATORS}")
    return rl_math.grpo_advantages(rewards, group_size, scale_by_std=estimator == "grpo")


def rollout_logprobs(params, reference, batch, *, model_cfg, temperature: float,
                     with_reference: bool):
    """The rollout policy's (and, for the KL term, the reference's) token log-probs."""
    out = {"old_logp": policy.token_logprobs(params, model_cfg, batch["tokens"], batch["mask"],
                                             temperature=temperature)}
    if with_reference:
        out["ref_logp"] = policy.token_logprobs(policy.reference(params, reference), model_cfg,
                                                batch["tokens"], batch["mask"],
                                                temperature=temperature)
    return out


def update_step(state, batch, rng, *, model_cfg, tx, grad_accum: int = 1, temperature: float,
                clip_eps: float, beta: float):
    """One step of GRPO's loss on a minibatch holding `tokens`, `mask`, `response`,
    `old_logp`, `advantages` [b] (and `ref_logp` when beta > 0)."""
    def loss_fn(params, mb, key):
        logp = policy.token_logprobs(params, model_cfg, mb["tokens"], mb["mask"],
                                     temperature=temperature, rng=key)
        ref = mb.get("ref_logp")
        return rl_math.grpo_policy_loss(logp, mb["old_logp"], mb["advantages"], mb["response"],
                                        clip_eps, beta if ref is not None else 0.0, ref)

    return mean_loss_update(state, batch, rng, loss_fn, tx, grad_accum)

"""PPO with a KL penalty for language models (InstructGPT's RL step), as jitted pure functions.

One iteration: sample responses to a batch of prompts (`ptjax.sampling`), score them (reward
model or Python function, outside this module), then `rollout_statistics` computes the rollout
policy's and the reference's log-probs and the values, `advantages` turns score and per-token
KL into whitened GAE advantages, and `update_step` takes clipped policy and value steps over
minibatches for several epochs. Conventions and defaults in ../shared/REFERENCE.md.

Arrays are over whole rows (prompt then response, [b, T]) and aligned with the tokens: entry t
belongs to token t, `response` marks the response tokens (EOS included). The value of token t
is read from the hidden state before it (where its log-prob comes from), so V_t estimates the
return from emitting token t on.

Two critics (`ppo.critic`). `shared`: a scalar head `value_head` on the policy's body, so one
forward gives log-probs and values; the head reads the body's features through a
stop-gradient, so the value loss trains the head only (a fresh head's large early errors would
otherwise push the shared body away from the policy: on the demo the policy's score fell while
the value loss was large). `separate`: a second model with its own body and value head
(`critic_values`), started from the reward model as InstructGPT does, and fitted by its own
optimizer step (`critic_step`); the policy then has no value head and `update_step` is its
clipped surrogate alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax.train import policy as policy_lib
from ptjax.train import rl_math
from ptjax.train.steps import mean_loss_update

F32 = jnp.float32
VALUE_HEAD = "value_head"


def values_from_hidden(head, h):
    """Values [b, T] aligned with the tokens (0 at t = 0) from a value head on hidden states
    [b, T, hidden]: V_t comes from h[t - 1], the state token t is sampled from."""
    values = (ops.linear(h[:, :-1], head["kernel"], F32) + head["bias"])[..., 0]
    return jnp.pad(values, ((0, 0), (1, 0)))


def logprobs_and_values(params, cfg, tokens, mask, temperature: float, rng=None):
    """(log-probs [b, T], entropy [b, T], values [b, T] or None) from one forward of the policy
    body; values come from its `value_head` (through a stop-gradient), None without one (a
    separate critic's policy)."""
    h = policy_lib.hidden(params, cfg, tokens, mask, rng)
    logp, logits = policy_lib.shifted_logprobs(params, cfg, h, tokens, temperature)
    entropy = jnp.pad(rl_math.entropy_from_logits(logits.astype(F32) / temperature),
                      ((0, 0), (1, 0)))
    if VALUE_HEAD not in params:
        return logp, entropy, None
    return logp, entropy, values_from_hidden(params[VALUE_HEAD], jax.lax.stop_gradient(h))


def critic_values(critic, cfg, tokens, mask, rng=None):
    """Values [b, T] of a separate critic (its own body and `value_head`); the gradient of a
    value loss reaches its whole body."""
    return values_from_hidden(critic[VALUE_HEAD], policy_lib.hidden(critic, cfg, tokens, mask,
                                                                     rng))


def rollout_statistics(params, reference, batch, *, model_cfg, temperature: float,
                       critic=None, critic_cfg=None):
    """Rollout-time log-probs, reference log-probs and values of `batch` (`tokens`, `mask`),
    computed once per iteration and held fixed through its epochs (no gradient). Values come
    from `critic` (a separate critic, with its `critic_cfg`) when given, else from the policy's
    value head."""
    logp, _, values = logprobs_and_values(params, model_cfg, batch["tokens"], batch["mask"],
                                          temperature)
    if critic is not None:
        values = critic_values(critic, critic_cfg, batch["tokens"], batch["mask"])
    ref_logp = policy_lib.token_logprobs(policy_lib.reference(params, reference), model_cfg,
                                         batch["tokens"], batch["mask"], temperature=temperature)
    return {"old_logp": logp, "ref_logp": ref_logp, "old_values": values}


def advantages(stats, score, response, *, beta, kl_kind: str, gamma: float, lam: float):
    """Per-token rewards (`-beta * kl_t`, score at the last response token), GAE advantages
    (whitened over response tokens) and returns; also the per-sequence KL summed over tokens."""
    kl = rl_math.kl_estimate(stats["old_logp"], stats["ref_logp"], kl_kind, response)
    rewards = rl_math.per_token_rewards(score, kl, beta, response)
    adv, returns = rl_math.gae(rewards, stats["old_values"], response, gamma, lam)
    return {"advantages": rl_math.masked_whiten(adv, response), "returns": returns,
            "kl": jnp.sum(kl, axis=-1), "rewards": rewards}


def value_terms(values, mb, clip_eps_value: float):
    """(clipped value loss, its metrics) of `values` against a minibatch's `old_values` and
    `returns` over its response tokens."""
    vf_loss, vf_stats = rl_math.ppo_value_loss(values, mb["old_values"], mb["returns"],
                                               mb["response"], clip_eps_value)
    return vf_loss, {"value_loss": vf_loss, **vf_stats}


def update_step(state, batch, rng, *, model_cfg, tx, grad_accum: int = 1, temperature: float,
                clip_eps: float, clip_eps_value: float, value_coef: float,
                entropy_coef: float = 0.0):
    """One PPO optimizer step on a minibatch holding `tokens`, `mask`, `response`, `old_logp`,
    `old_values`, `advantages` and `returns`: clipped surrogate + value_coef * clipped value loss
    - entropy_coef * entropy. Metrics: the losses, clip fractions, approximate KL, entropy.
    A policy without a value head (separate critic) takes the surrogate and entropy terms only."""
    def loss_fn(params, mb, key):
        logp, entropy, values = logprobs_and_values(params, model_cfg, mb["tokens"], mb["mask"],
                                                    temperature, key)
        response = mb["response"]
        pg_loss, pg_stats = rl_math.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"],
                                                    response, clip_eps)
        mean_entropy = rl_math.masked_mean(entropy, response)
        loss = pg_loss - entropy_coef * mean_entropy
        metrics = {"policy_loss": pg_loss, "entropy": mean_entropy, **pg_stats}
        if values is not None:
            vf_loss, vf_metrics = value_terms(values, mb, clip_eps_value)
            loss = loss + value_coef * vf_loss
            metrics |= vf_metrics
        return loss, metrics

    return mean_loss_update(state, batch, rng, loss_fn, tx, grad_accum)


def critic_step(state, batch, rng, *, model_cfg, tx, grad_accum: int = 1,
                clip_eps_value: float):
    """One optimizer step of a separate critic on the clipped value loss of a minibatch (the
    same minibatch the policy step sees). Metrics: value loss and value clip fraction."""
    def loss_fn(params, mb, key):
        values = critic_values(params, model_cfg, mb["tokens"], mb["mask"], key)
        return value_terms(values, mb, clip_eps_value)

    return mean_loss_update(state, batch, rng, loss_fn, tx, grad_accum)

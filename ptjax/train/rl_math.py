"""The arithmetic of preference alignment (reward models, PPO with a KL penalty, DPO, GRPO, RLOO).

These are small pure functions on arrays, kept apart from the train steps so that every formula is
tested on its own against an independent float64 reference (tests/test_rl_math.py): a sign or an
off-by-one in an advantage, a biased variance or a `>=` in a clip fraction changes training
silently, and is far easier to see here than in a reward curve.

Conventions shared by all functions:

- Token arrays are [batch, T]; a *mask* is a float or bool [batch, T] array with 1 on response
  tokens and 0 on prompt and padding tokens. Prompt/padding may sit on either side (left padding,
  prompt before the response, right padding after it).
- Masked-out positions never reach a result: they are selected away with `jnp.where` rather than
  multiplied by 0, so even inf or nan there (an unmasked log-ratio of padding can be huge) leaves
  the result and its gradient finite. Per-token outputs are exactly 0 at mask == 0.
- Results are float32 (`F32`) whatever the input float dtype, so bf16 log-probs are upcast.
- Every function is jit-able; the string/int switches (`kind`, `loss_type`, `group_size`, `axis`,
  `average`, `unbiased`, `shift_mean`) are static arguments.
- Losses return `(scalar loss, stats)`, stats a dict of float32 scalars for logging, so they plug
  into `jax.value_and_grad(..., has_aux=True)`.

Formulas follow the section "Reward models, PPO with a KL penalty, DPO, GRPO" of REFERENCE.md
(Ziegler et al. 1909.08593, InstructGPT 2203.02155, DPO 2305.18290, GRPO 2402.03300).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32

WHITEN_EPS = 1e-8
KL_KINDS = ("k1", "k2", "k3")
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _f32(x):
    return jnp.asarray(x).astype(F32)


def _keep(mask):
    """Bool [batch, T]: which positions count (mask != 0)."""
    return jnp.asarray(mask) != 0


def _safe_div(num, den):
    """num / den, and 0 where den == 0 (no nan, no nan gradient)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# --------------------------------------------------------------------------- masked statistics

def masked_mean(x, mask, axis=None):
    """Mean of `x` over the positions where `mask` is nonzero, weighted by `mask`.

    x, mask: same shape (mask float or bool; a 0/1 mask gives the plain mean over kept entries).
    axis: None (one scalar over everything) or an axis / tuple of axes, as in `jnp.sum`.
    Returns float32, shape of `x` reduced over `axis`; 0 where nothing is kept.
    """
    m = _f32(mask)
    total = jnp.sum(jnp.where(_keep(mask), _f32(x) * m, 0.0), axis=axis)
    return _safe_div(total, jnp.sum(m, axis=axis))


def masked_var(x, mask, unbiased=True):
    """Variance of `x` over the kept positions of a 0/1 `mask` (all axes), float32 scalar.

    unbiased=True divides the sum of squared deviations by n - 1 (Bessel, as TRL's `masked_var`
    and torch.var do), n = number of kept entries; unbiased=False divides by n. With n <= 1
    (unbiased) or n = 0 the variance is undefined and 0 is returned, so whitening then gives 0.
    """
    keep = _keep(mask)
    xf = _f32(x)
    mean = masked_mean(xf, mask)
    sq = jnp.sum(jnp.where(keep, (xf - mean) ** 2, 0.0))
    n = jnp.sum(keep.astype(F32))
    den = n - 1.0 if unbiased else n
    return jnp.where(den > 0, sq / jnp.maximum(den, 1.0), 0.0)


def masked_whiten(x, mask, shift_mean=True):
    """`(x - mean) * rsqrt(var + 1e-8)` over the kept tokens of a 0/1 `mask`, 0 at mask == 0.

    mean is `masked_mean`, var the masked *unbiased* variance (`masked_var`), both over the whole
    batch. shift_mean=False adds the mean back (rescale only), as TRL does for rewards.
    x, mask: [batch, T] (any shape works); returns float32 of x's shape.
    """
    xf = _f32(x)
    mean = masked_mean(xf, mask)
    white = (xf - mean) * jax.lax.rsqrt(masked_var(xf, mask, unbiased=True) + WHITEN_EPS)
    if not shift_mean:
        white = white + mean
    return jnp.where(_keep(mask), white, 0.0)


def explained_variance(values, returns, mask):
    """`1 - var(R - V) / var(R)` over the kept tokens of `mask` (float32 scalar).

    values, returns, mask: [batch, T]. Both variances use the same estimator (unbiased masked
    variance), so the Bessel factor cancels. 1 is a perfect value function, 0 no better than the
    mean return, negative worse; nan when var(R) is 0 (undefined).
    """
    var_r = masked_var(returns, mask)
    var_d = masked_var(_f32(returns) - _f32(values), mask)
    return jnp.where(var_r > 0, 1.0 - var_d / jnp.where(var_r > 0, var_r, 1.0), jnp.nan)


# --------------------------------------------------------------------------- log-probs, KL, entropy

def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature) gathered at `tokens`, float32.

    logits: [..., vocab] (any float dtype, computed in float32); tokens: int [...]. Returns [...].
    Pass the sampling temperature so the log-probs are those of the distribution that sampled.
    """
    z = _f32(logits) / temperature
    picked = jnp.take_along_axis(z, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)
    return picked[..., 0] - jax.nn.logsumexp(z, axis=-1)


def sequence_logps(token_logps, mask, average=False):
    """Per-row sum (average=False) or mean over response tokens (average=True) of log-probs.

    token_logps, mask: [batch, T]. Returns float32 [batch]; a row with no response token gives 0.
    The averaged form is the length-normalized log-prob IPO expects.
    """
    keep = _keep(mask)
    total = jnp.sum(jnp.where(keep, _f32(token_logps), 0.0), axis=-1)
    if average:
        return _safe_div(total, jnp.sum(keep.astype(F32), axis=-1))
    return total


def kl_estimate(logp, ref_logp, kind="k3", mask=None):
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs, float32.

    logp, ref_logp: [batch, T] log-probs of the sampled tokens under the policy and the reference.
    With `logr = ref_logp - logp`:
      "k1": `-logr` (unbiased, can be negative), "k2": `0.5 * logr^2`,
      "k3": `exp(logr) - 1 - logr` (unbiased, >= 0; computed as `expm1(logr) - logr`, which stays
      accurate for small logr and is never negative in floating point).
    mask: optional [batch, T]; estimates are 0 where it is 0. Returns [batch, T].
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind {kind!r} not in {KL_KINDS}")
    logr = _f32(ref_logp) - _f32(logp)
    if mask is not None:
        logr = jnp.where(_keep(mask), logr, 0.0)
    if kind == "k1":
        kl = -logr
    elif kind == "k2":
        kl = 0.5 * logr ** 2
    else:
        kl = jnp.expm1(logr) - logr
    return kl if mask is None else jnp.where(_keep(mask), kl, 0.0)


def entropy_from_logits(logits, mask=None):
    """Per-token entropy `-sum_v p_v log p_v` of softmax(logits), float32.

    logits: [batch, T, vocab] (any float dtype; log-softmax in float32, so large logits are
    fine and -inf logits contribute 0). mask: optional [batch, T], entropy 0 where it is 0.
    Returns [batch, T].
    """
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    logp = jnp.where(jnp.isfinite(logp), logp, 0.0)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return ent if mask is None else jnp.where(_keep(mask), ent, 0.0)


# --------------------------------------------------------------------------- PPO

def last_token_onehot(mask):
    """Bool [batch, T]: True at the last index of each row where `mask` is nonzero (none if the
    row has no response token)."""
    keep = _keep(mask)
    after = jnp.cumsum(keep[:, ::-1].astype(jnp.int32), axis=-1)[:, ::-1]   # kept at >= t
    return keep & (after == 1)


def per_token_rewards(score, kl, beta, mask):
    """PPO's per-token reward: `-beta * kl_t` on response tokens, plus `score` at each row's last
    response token (the last index where mask == 1), 0 at prompt/padding.

    score: [batch] reward-model scores; kl: [batch, T] per-token KL estimates (`kl_estimate`);
    beta: KL coefficient (a float or a traced scalar, e.g. from `adaptive_kl_coef`); mask:
    [batch, T]. A row without response tokens gets all zeros. Returns float32 [batch, T].
    """
    keep = _keep(mask)
    r = jnp.where(keep, -beta * _f32(kl), 0.0)
    return r + jnp.where(last_token_onehot(mask), _f32(score)[:, None], 0.0)


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over [batch, T]: (advantages, returns), float32.

    rewards and values are first set to 0 at mask == 0; then, backwards over the *whole* row
    with V_T = A_T = 0 beyond its end,
      `delta_t = r_t + gamma V_{t+1} - V_t`,  `A_t = delta_t + gamma lam A_{t+1}`,
    so the zeros after the last response token end the episode (right padding) and prompt/left
    padding positions are computed but never read. returns = A + V. Both outputs are 0 at
    mask == 0. gamma, lam: floats or traced scalars.
    """
    keep = _keep(mask)
    r = jnp.where(keep, _f32(rewards), 0.0)
    v = jnp.where(keep, _f32(values), 0.0)

    def step(carry, xs):
        next_v, next_a = carry
        r_t, v_t = xs
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        return (v_t, a_t), a_t

    zeros = jnp.zeros(r.shape[:1], F32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T), reverse=True)
    adv = adv.T
    return jnp.where(keep, adv, 0.0), jnp.where(keep, adv + v, 0.0)


def _ratio(logp, old_logp, keep):
    """Importance ratio exp(logp - old_logp), with the log-ratio zeroed off-mask (no overflow)."""
    logratio = jnp.where(keep, _f32(logp) - _f32(old_logp), 0.0)
    return logratio, jnp.exp(logratio)


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps):
    """PPO's clipped surrogate: `masked_mean(max(-A rho, -A clip(rho, 1-eps, 1+eps)))`.

    logp, old_logp: [batch, T] sampled tokens' log-probs under the current and the rollout
    policy; advantages: [batch, T] (usually `masked_whiten`ed GAE advantages); mask: [batch, T];
    the mean runs over all response tokens of the batch. Returns (loss, stats):
      clip_fraction: share of tokens where the clipped term was taken (strict `>`),
      approx_kl: `0.5 * masked_mean((logp - old_logp)^2)`, ratio_mean: masked mean of rho.
    """
    keep = _keep(mask)
    logratio, rho = _ratio(logp, old_logp, keep)
    a = _f32(advantages)
    unclipped = -a * rho
    clipped = -a * jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(F32), mask),
        "approx_kl": 0.5 * masked_mean(logratio ** 2, mask),
        "ratio_mean": masked_mean(rho, mask),
    }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip_eps_v):
    """Clipped value loss `0.5 * masked_mean(max((V-R)^2, (clip(V, V_old-eps, V_old+eps) - R)^2))`.

    values: [batch, T] current predictions V; old_values: rollout-time V_old; returns: GAE
    returns R (targets); mask: [batch, T]. Returns (loss, {"value_clip_fraction"}): the share of
    response tokens where the clipped error was taken (strict `>`).
    """
    v, v_old, ret = _f32(values), _f32(old_values), _f32(returns)
    v_clipped = jnp.clip(v, v_old - clip_eps_v, v_old + clip_eps_v)
    err = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    return loss, {"value_clip_fraction": masked_mean((err_clipped > err).astype(F32), mask)}


def adaptive_kl_coef(beta, kl, target, horizon, n_steps):
    """Ziegler et al.'s proportional KL controller: the next KL coefficient (float32 scalar).

    `e = clip(kl / target - 1, -0.2, 0.2)`, `beta * (1 + e * n_steps / horizon)`: beta grows when
    the measured KL (per sequence, summed over tokens) exceeds `target`, shrinks below it.
    n_steps is the number of samples (batch size) in the step; horizon is typically 10000,
    target 6.
    """
    e = jnp.clip(_f32(kl) / target - 1.0, -0.2, 0.2)
    return _f32(beta) * (1.0 + e * n_steps / horizon)


# --------------------------------------------------------------------------- reward model, DPO

def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef=0.0):
    """Pairwise reward-model loss `mean(-log_sigmoid(r_c - r_r - margin))`
    `+ center_coef * mean((r_c + r_r)^2)` (centering keeps rewards near 0; c ~ 0.01).

    r_chosen, r_rejected: [batch] scalar rewards; margin: optional [batch] (or scalar) required
    gap. Returns (loss, stats): accuracy (share with r_c > r_r, strict), chosen_mean,
    rejected_mean.
    """
    rc, rr = _f32(r_chosen), _f32(r_rejected)
    diff = rc - rr if margin is None else rc - rr - _f32(margin)
    loss = jnp.mean(-jax.nn.log_sigmoid(diff)) + center_coef * jnp.mean((rc + rr) ** 2)
    stats = {"accuracy": jnp.mean((rc > rr).astype(F32)), "chosen_mean": jnp.mean(rc),
             "rejected_mean": jnp.mean(rr)}
    return loss, stats


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """DPO (or IPO) loss on sequence log-probs, all [batch] (see `sequence_logps`).

    With `delta = (pc - rc) - (pr - rr)` (policy minus reference log-ratio, chosen minus
    rejected):
      "sigmoid" (DPO): `-(1-ls) log_sigmoid(beta delta) - ls log_sigmoid(-beta delta)`, ls the
        label smoothing (the conservative cDPO form; ls = 0 is plain DPO);
      "ipo": `(delta - 1/(2 beta))^2`. IPO is defined on *length-averaged* log-probs: the caller
        passes `sequence_logps(..., average=True)`; label_smoothing is ignored.
    Returns (mean loss, stats), stats batch means: chosen_rewards `beta (pc - rc)`,
    rejected_rewards `beta (pr - rr)`, reward_accuracy (chosen > rejected, strict),
    reward_margin (chosen - rejected).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} not in {DPO_LOSS_TYPES}")
    chosen_ratio = _f32(policy_chosen_logps) - _f32(ref_chosen_logps)
    rejected_ratio = _f32(policy_rejected_logps) - _f32(ref_rejected_logps)
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * delta))
    else:
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
    stats = {"chosen_rewards": jnp.mean(chosen), "rejected_rewards": jnp.mean(rejected),
             "reward_accuracy": jnp.mean((chosen > rejected).astype(F32)),
             "reward_margin": jnp.mean(chosen - rejected)}
    return jnp.mean(losses), stats


# --------------------------------------------------------------------------- GRPO, RLOO

def _groups(rewards, group_size):
    r = _f32(rewards)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards {r.shape} must be [batch] with batch a multiple of {group_size}")
    return r.reshape(-1, group_size)


def grpo_advantages(rewards, group_size, scale_by_std=True, eps=1e-4):
    """GRPO's group-relative advantages `(r - mean_group) / (std_group + eps)`, float32 [batch].

    rewards: [batch], ordered so each run of `group_size` consecutive entries are completions of
    one prompt. std_group is the *unbiased* (ddof=1) group standard deviation, as torch.std
    computes it in TRL's GRPO; hence group_size >= 2. scale_by_std=False (Dr. GRPO) returns
    `r - mean_group` only. group_size is static.
    """
    if group_size < 2 and scale_by_std:
        raise ValueError("an unbiased group std needs group_size >= 2")
    g = _groups(rewards, group_size)
    centered = g - jnp.mean(g, axis=-1, keepdims=True)
    if scale_by_std:
        std = jnp.sqrt(jnp.sum(centered ** 2, axis=-1, keepdims=True) / (group_size - 1))
        centered = centered / (std + eps)
    return centered.reshape(-1)


def rloo_advantages(rewards, group_size):
    """REINFORCE leave-one-out advantages: `r_i - mean of the other G-1 rewards of its group`.

    rewards: [batch] in consecutive groups of `group_size` (static, >= 2). Returns float32
    [batch]; equals `G/(G-1) * (r_i - mean_group)`.
    """
    if group_size < 2:
        raise ValueError("leave-one-out needs group_size >= 2")
    g = _groups(rewards, group_size)
    others = (jnp.sum(g, axis=-1, keepdims=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def grpo_policy_loss(logp, old_logp, advantages, mask, clip_eps, beta=0.0, ref_logp=None):
    """GRPO's loss: per token `-min(rho A, clip(rho, 1-eps, 1+eps) A) + beta * k3`, averaged over
    the response tokens of each sequence, then over sequences.

    logp, old_logp: [batch, T]; advantages: [batch] (one per completion, broadcast over its
    tokens); mask: [batch, T]; ref_logp: [batch, T] reference log-probs for the KL term
    (k3 with `logr = ref_logp - logp`, see `kl_estimate`); ref_logp=None means no KL term, and
    then a nonzero Python-number beta is an error (a traced beta is not checked, so jit with
    beta as an argument works). A row with no response token adds 0
    but still counts in the mean over sequences (as TRL does). Returns (loss, stats):
      clip_fraction: share of response tokens where the clipped term was taken (strict),
      kl: token-level masked mean of k3 (0 without ref_logp).
    """
    if ref_logp is None and isinstance(beta, (int, float)) and beta != 0:
        raise ValueError("beta != 0 needs ref_logp")
    keep = _keep(mask)
    _, rho = _ratio(logp, old_logp, keep)
    a = _f32(advantages)[:, None]
    unclipped = rho * a
    clipped = jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps) * a
    per_token = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(per_token) if ref_logp is None else kl_estimate(logp, ref_logp, "k3", mask)
    if ref_logp is not None:
        per_token = per_token + beta * kl
    loss = jnp.mean(masked_mean(per_token, mask, axis=-1))
    stats = {"clip_fraction": masked_mean((clipped < unclipped).astype(F32), mask),
             "kl": masked_mean(kl, mask)}
    return loss, stats

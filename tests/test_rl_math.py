"""`ptjax.train.rl_math` against independent numpy float64 references.

Each reference below is written from the formula (REFERENCE.md, "Reward models, PPO with a KL
penalty, DPO, GRPO"), mostly as explicit loops over the kept tokens, never by calling the module.
Inputs are float32 with rows of different response lengths laid out with left padding, right
padding and prompt-then-response, and the padding holds large garbage (sometimes inf/nan), so any
leak of a masked position shows. Closed forms (GAE with gamma = lam = 1 is reward-to-go minus
value, whitened advantages have mean 0 and unbiased variance 1, DPO at delta = 0 is log 2, ...)
and the strictness of the clip fractions are checked separately.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax.train import rl_math as R

B, T, V = 6, 12, 17
RTOL, ATOL = 1e-5, 1e-5


# --------------------------------------------------------------------------- inputs

def _mask(seed=0, empty_row=False):
    """[B, T] 0/1 float32 mask: full row, left-padded, right-padded, prompt+response+pad, one
    token, and a random span (or an all-zero row when empty_row)."""
    rng = np.random.default_rng(seed)
    spans = [(0, T), (T - 5, T), (0, 7), (3, 9), (int(rng.integers(T)), 1)]
    start = int(rng.integers(0, T - 2))
    spans.append((start, 0) if empty_row else (start, int(rng.integers(2, T - start + 1))))
    m = np.zeros((B, T), np.float32)
    for i, (s, n) in enumerate(spans[:B]):
        m[i, s:s + n] = 1
    return m


def _data(seed, mask, scale=1.0, garbage=1e3, shape=None):
    """float32 random values on the kept tokens, large garbage elsewhere."""
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=shape or mask.shape)).astype(np.float32)
    junk = (garbage * rng.normal(size=x.shape)).astype(np.float32)
    return np.where(mask > 0, x, junk).astype(np.float32)


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def _close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def _kept(mask):
    """[(row, t)] of the kept tokens, row-major."""
    return [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]


def _scalar(x):
    chex.assert_shape(x, ())
    chex.assert_type(x, jnp.float32)
    return float(x)


# --------------------------------------------------------------------------- references (float64)

def ref_mean(x, mask):
    vals = [x[i, t] for i, t in _kept(mask)]
    return sum(vals) / len(vals)


def ref_var(x, mask, ddof=1):
    vals = np.array([x[i, t] for i, t in _kept(mask)], np.float64)
    mu = vals.sum() / len(vals)
    return ((vals - mu) ** 2).sum() / (len(vals) - ddof)


def ref_whiten(x, mask, shift_mean=True):
    mu, var = ref_mean(x, mask), ref_var(x, mask, ddof=1)
    out = np.zeros(x.shape)
    for i, t in _kept(mask):
        out[i, t] = (x[i, t] - mu) / np.sqrt(var + 1e-8) + (0 if shift_mean else mu)
    return out


def ref_kl(logp, ref_logp, kind):
    logr = ref_logp - logp
    return {"k1": -logr, "k2": 0.5 * logr ** 2, "k3": np.exp(logr) - 1 - logr}[kind]


def ref_per_token_rewards(score, kl, beta, mask):
    out = np.zeros(kl.shape)
    for i in range(kl.shape[0]):
        idx = [t for t in range(kl.shape[1]) if mask[i, t]]
        for t in idx:
            out[i, t] = -beta * kl[i, t]
        if idx:
            out[i, idx[-1]] += score[i]
    return out


def ref_gae(rewards, values, mask, gamma, lam):
    r, v = np.where(mask > 0, rewards, 0.0), np.where(mask > 0, values, 0.0)
    adv = np.zeros(r.shape)
    for i in range(r.shape[0]):
        next_v = next_a = 0.0
        for t in reversed(range(r.shape[1])):
            delta = r[i, t] + gamma * next_v - v[i, t]
            next_a = delta + gamma * lam * next_a
            next_v = v[i, t]
            adv[i, t] = next_a
    return adv * (mask > 0), (adv + v) * (mask > 0)


def ref_ppo_policy(logp, old_logp, adv, mask, eps):
    losses, clipped, sq, ratios = [], [], [], []
    for i, t in _kept(mask):
        lr = logp[i, t] - old_logp[i, t]
        rho = np.exp(lr)
        a = -adv[i, t] * rho
        b = -adv[i, t] * min(max(rho, 1 - eps), 1 + eps)
        losses.append(max(a, b))
        clipped.append(float(b > a))
        sq.append(lr * lr)
        ratios.append(rho)
    return np.mean(losses), np.mean(clipped), 0.5 * np.mean(sq), np.mean(ratios)


def ref_ppo_value(v, v_old, ret, mask, eps):
    losses, clipped = [], []
    for i, t in _kept(mask):
        vc = min(max(v[i, t], v_old[i, t] - eps), v_old[i, t] + eps)
        e1, e2 = (v[i, t] - ret[i, t]) ** 2, (vc - ret[i, t]) ** 2
        losses.append(max(e1, e2))
        clipped.append(float(e2 > e1))
    return 0.5 * np.mean(losses), np.mean(clipped)


def ref_entropy(logits):
    out = np.zeros(logits.shape[:-1])
    for idx in np.ndindex(*logits.shape[:-1]):
        z = logits[idx] - logits[idx].max()
        p = np.exp(z) / np.exp(z).sum()
        out[idx] = -sum(pi * np.log(pi) for pi in p if pi > 0)
    return out


def ref_logprobs(logits, tokens, temperature):
    out = np.zeros(tokens.shape)
    for idx in np.ndindex(*tokens.shape):
        z = logits[idx] / temperature
        out[idx] = z[tokens[idx]] - (z.max() + np.log(np.exp(z - z.max()).sum()))
    return out


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def ref_grpo_advantages(r, g, scale_by_std, eps):
    out = np.zeros(r.shape)
    for s in range(0, len(r), g):
        grp = r[s:s + g]
        mu = grp.sum() / g
        std = np.sqrt(((grp - mu) ** 2).sum() / (g - 1))
        out[s:s + g] = (grp - mu) / (std + eps) if scale_by_std else grp - mu
    return out


def ref_rloo(r, g):
    out = np.zeros(r.shape)
    for i in range(len(r)):
        s = i - i % g
        others = [r[j] for j in range(s, s + g) if j != i]
        out[i] = r[i] - sum(others) / len(others)
    return out


def ref_grpo_loss(logp, old_logp, adv, mask, eps, beta, ref_logp):
    seq_losses, clipped, kls = [], [], []
    for i in range(logp.shape[0]):
        toks = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            rho = np.exp(logp[i, t] - old_logp[i, t])
            a, b = rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i]
            lr = ref_logp[i, t] - logp[i, t] if ref_logp is not None else 0.0
            k3 = np.exp(lr) - 1 - lr
            toks.append(-min(a, b) + beta * k3)
            clipped.append(float(b < a))
            kls.append(k3)
        seq_losses.append(sum(toks) / len(toks) if toks else 0.0)
    return np.mean(seq_losses), np.mean(clipped), np.mean(kls)


# --------------------------------------------------------------------------- masked statistics

@pytest.mark.parametrize("bool_mask", [False, True])
def test_masked_mean_var(bool_mask):
    m = _mask(1)
    x = _data(2, m, scale=3.0)
    mask = m > 0 if bool_mask else m
    (x64,) = _f64(x)
    assert _scalar(R.masked_mean(x, mask)) == pytest.approx(ref_mean(x64, m), rel=RTOL)
    assert _scalar(R.masked_var(x, mask)) == pytest.approx(ref_var(x64, m, 1), rel=RTOL)
    assert _scalar(R.masked_var(x, mask, unbiased=False)) == pytest.approx(ref_var(x64, m, 0),
                                                                           rel=RTOL)
    rows = R.masked_mean(x, mask, axis=1)
    chex.assert_shape(rows, (B,))
    _close(rows, [ref_mean(x64[i:i + 1], m[i:i + 1]) for i in range(B)])


def test_masked_var_degenerate():
    """No kept token: mean 0 and variance 0; one kept token: unbiased variance 0 (undefined)."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    none, one = np.zeros((2, 3)), np.array([[0, 1, 0], [0, 0, 0]])
    assert float(R.masked_mean(x, none)) == 0 and float(R.masked_var(x, none)) == 0
    assert float(R.masked_var(x, one)) == 0 and float(R.masked_var(x, one, unbiased=False)) == 0
    np.testing.assert_array_equal(R.masked_whiten(x, one), 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    m = _mask(3)
    x = _data(4, m, scale=2.0) + 1.5 * m
    got = R.masked_whiten(x, m, shift_mean=shift_mean)
    chex.assert_shape(got, (B, T))
    chex.assert_type(got, jnp.float32)
    (x64,) = _f64(x)
    _close(got, ref_whiten(x64, m, shift_mean))
    assert np.all(np.asarray(got)[m == 0] == 0)
    if shift_mean:    # closed form: masked mean 0, masked unbiased variance 1
        g = np.asarray(got, np.float64)
        assert ref_mean(g, m) == pytest.approx(0.0, abs=1e-6)
        assert ref_var(g, m, ddof=1) == pytest.approx(1.0, rel=1e-5)


def test_explained_variance():
    m = _mask(5)
    ret = _data(6, m, scale=2.0)
    val = np.where(m > 0, ret + 0.5 * _data(7, m), _data(8, m)).astype(np.float32)
    r64, v64 = _f64(ret, val)
    want = 1 - ref_var(r64 - v64, m) / ref_var(r64, m)
    assert _scalar(R.explained_variance(val, ret, m)) == pytest.approx(want, rel=RTOL)
    assert float(R.explained_variance(ret, ret, m)) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- log-probs, KL, entropy

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits(temperature):
    rng = np.random.default_rng(9)
    logits = (4 * rng.normal(size=(B, T, V))).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    got = R.logprobs_from_logits(logits, tokens, temperature)
    chex.assert_shape(got, (B, T))
    chex.assert_type(got, jnp.float32)
    _close(got, ref_logprobs(*_f64(logits), tokens, temperature))
    jitted = jax.jit(R.logprobs_from_logits)(jnp.asarray(logits, jnp.bfloat16), tokens,
                                             temperature)
    chex.assert_type(jitted, jnp.float32)     # bf16 logits, float32 log-probs


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps(average):
    m = _mask(10, empty_row=True)
    lp = _data(11, m) - 2.0
    got = R.sequence_logps(lp, m, average=average)
    chex.assert_shape(got, (B,))
    (lp64,) = _f64(lp)
    want = []
    for i in range(B):
        vals = [lp64[i, t] for t in range(T) if m[i, t]]
        want.append((sum(vals) / len(vals) if average else sum(vals)) if vals else 0.0)
    _close(got, want)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate(kind):
    m = _mask(12)
    lp, rlp = _data(13, m) - 2.0, _data(14, m) - 2.0
    lp64, rlp64 = _f64(np.where(m > 0, lp, 0), np.where(m > 0, rlp, 0))
    got = R.kl_estimate(lp, rlp, kind)
    chex.assert_shape(got, (B, T))
    chex.assert_type(got, jnp.float32)
    keep = m > 0
    _close(np.asarray(got)[keep], ref_kl(lp64, rlp64, kind)[keep])
    masked = jax.jit(R.kl_estimate, static_argnames="kind")(lp, rlp, kind=kind, mask=m)
    _close(masked, np.where(keep, ref_kl(lp64, rlp64, kind), 0.0))
    with pytest.raises(ValueError):
        R.kl_estimate(lp, rlp, "k4")


def test_k3_nonnegative_and_zero_at_equality():
    logr = np.concatenate([-np.logspace(-9, 2, 4000), [0.0], np.logspace(-9, 1.5, 4000)])
    k3 = np.asarray(R.kl_estimate(np.zeros_like(logr, np.float32), logr.astype(np.float32), "k3"))
    assert np.all(k3 >= 0) and k3[4000] == 0
    lp = _data(15, np.ones((B, T)))
    np.testing.assert_array_equal(R.kl_estimate(lp, lp, "k3"), 0.0)


def test_entropy_from_logits():
    m = _mask(16)
    rng = np.random.default_rng(17)
    logits = (3 * rng.normal(size=(B, T, V)) + 50).astype(np.float32)  # offset: must be stable
    got = R.entropy_from_logits(logits)
    chex.assert_shape(got, (B, T))
    chex.assert_type(got, jnp.float32)
    want = ref_entropy(*_f64(logits))
    _close(got, want)
    _close(R.entropy_from_logits(logits, m), want * m)
    # uniform over k allowed entries (others -inf): log k, finite
    masked_vocab = np.where(np.arange(V) < 5, 0.0, -np.inf).astype(np.float32)
    assert float(R.entropy_from_logits(masked_vocab[None, None])[0, 0]) == pytest.approx(np.log(5))


# --------------------------------------------------------------------------- PPO

def test_per_token_rewards():
    m = _mask(18, empty_row=True)
    kl = _data(19, m, garbage=np.inf)
    score = np.random.default_rng(20).normal(size=B).astype(np.float32)
    got = jax.jit(R.per_token_rewards)(score, kl, 0.05, m)
    chex.assert_shape(got, (B, T))
    chex.assert_type(got, jnp.float32)
    kl64, s64 = _f64(np.where(m > 0, kl, 0), score)
    want = ref_per_token_rewards(s64, kl64, 0.05, m)
    _close(got, want)
    # closed form: each row sums to score - beta * sum kl (an empty row to 0)
    row_sum = [(s64[i] - 0.05 * kl64[i].sum()) if m[i].any() else 0.0 for i in range(B)]
    _close(np.asarray(got).sum(1), row_sum)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae(gamma, lam):
    m = _mask(21)
    rew, val = _data(22, m), _data(23, m)
    adv, ret = jax.jit(R.gae)(rew, val, m, gamma, lam)
    chex.assert_shape([adv, ret], (B, T))
    chex.assert_type([adv, ret], jnp.float32)
    want_adv, want_ret = ref_gae(*_f64(rew, val), m, gamma, lam)
    _close(adv, want_adv)
    _close(ret, want_ret)


def test_gae_closed_forms():
    """gamma = lam = 1: advantage = reward-to-go minus value, return = reward-to-go (the zeros
    after the response end the episode); lam = 0: the one-step TD error."""
    m = _mask(24)
    rew, val = _data(25, m, garbage=np.nan), _data(26, m, garbage=np.nan)
    r64, v64 = _f64(np.where(m > 0, rew, 0), np.where(m > 0, val, 0))
    togo = np.cumsum(r64[:, ::-1], axis=1)[:, ::-1]
    adv, ret = R.gae(rew, val, m, 1.0, 1.0)
    _close(adv, (togo - v64) * m)
    _close(ret, togo * m)
    adv0, _ = R.gae(rew, val, m, 0.9, 0.0)
    next_v = np.concatenate([v64[:, 1:], np.zeros((B, 1))], axis=1)
    _close(adv0, (r64 + 0.9 * next_v - v64) * m)


def test_ppo_policy_loss():
    m = _mask(27)
    lp, old = _data(28, m, 0.3, garbage=100) - 1.0, _data(29, m, 0.3, garbage=-100) - 1.0
    adv = _data(30, m)
    fn = jax.jit(R.ppo_policy_loss)
    loss, stats = fn(lp, old, adv, m, 0.2)
    want = ref_ppo_policy(*_f64(lp, old, adv), m, 0.2)
    assert _scalar(loss) == pytest.approx(want[0], rel=RTOL)
    for key, w in zip(["clip_fraction", "approx_kl", "ratio_mean"], want[1:]):
        assert _scalar(stats[key]) == pytest.approx(w, rel=RTOL), key
    assert 0 < float(stats["clip_fraction"]) < 1      # both branches are exercised
    # gradient: -A rho / n on tokens where the unclipped term is taken, 0 elsewhere (and finite
    # although the padding's log-ratio is 200)
    g = np.asarray(jax.grad(lambda x: fn(x, old, adv, m, 0.2)[0])(lp), np.float64)
    lp64, old64, adv64 = _f64(lp, old, adv)
    rho = np.exp(np.where(m > 0, lp64 - old64, 0))
    unclipped = (np.abs(rho - 1) < 0.2) | (-adv64 * rho > -adv64 * np.clip(rho, 0.8, 1.2))
    want_g = np.where((m > 0) & unclipped, -adv64 * rho / m.sum(), 0.0)
    _close(g, want_g, atol=1e-7)


def test_clip_fractions_are_strict():
    """Ties (A = 0, rho = 1, V = V_old) take neither branch: a `>=` would count them all."""
    m = _mask(31)
    lp = _data(32, m, 0.5)
    zero = np.zeros((B, T), np.float32)
    _, s = R.ppo_policy_loss(lp + 0.5, lp, zero, m, 0.2)        # A = 0 everywhere
    assert float(s["clip_fraction"]) == 0
    _, s = R.ppo_policy_loss(lp, lp, _data(33, m), m, 0.2)      # rho = 1 everywhere
    assert float(s["clip_fraction"]) == 0 and float(s["approx_kl"]) == 0
    _, s = R.ppo_value_loss(lp, lp, _data(34, m), m, 0.2)       # V = V_old
    assert float(s["value_clip_fraction"]) == 0
    _, s = R.grpo_policy_loss(lp, lp, np.ones(B, np.float32), m, 0.2)
    assert float(s["clip_fraction"]) == 0
    _, s = R.bradley_terry_loss(np.ones(4, np.float32), np.ones(4, np.float32))
    assert float(s["accuracy"]) == 0


def test_ppo_value_loss():
    m = _mask(35)
    val, old, ret = _data(36, m), _data(37, m), _data(38, m)
    loss, stats = jax.jit(R.ppo_value_loss)(val, old, ret, m, 0.2)
    want_loss, want_frac = ref_ppo_value(*_f64(val, old, ret), m, 0.2)
    assert _scalar(loss) == pytest.approx(want_loss, rel=RTOL)
    assert _scalar(stats["value_clip_fraction"]) == pytest.approx(want_frac, rel=RTOL)
    assert 0 < want_frac < 1


def test_adaptive_kl_coef():
    for kl, target, horizon, n in [(3.0, 6.0, 10000, 256), (6.6, 6.0, 10000, 64),
                                   (100.0, 6.0, 1000, 32), (0.0, 6.0, 10000, 128)]:
        e = min(max(kl / target - 1, -0.2), 0.2)
        want = 0.05 * (1 + e * n / horizon)
        got = jax.jit(R.adaptive_kl_coef)(0.05, kl, target, horizon, n)
        assert _scalar(got) == pytest.approx(want, rel=RTOL)
    assert float(R.adaptive_kl_coef(0.05, 6.0, 6.0, 10000, 256)) == pytest.approx(0.05)


# --------------------------------------------------------------------------- reward model, DPO

@pytest.mark.parametrize("use_margin,center", [(False, 0.0), (True, 0.01)])
def test_bradley_terry_loss(use_margin, center):
    rng = np.random.default_rng(39)
    rc, rr = rng.normal(size=(2, 16)).astype(np.float32) * 2
    rr[:3] = rc[:3]                                    # ties count as wrong (strict)
    margin = rng.uniform(0, 1, 16).astype(np.float32) if use_margin else None
    loss, stats = jax.jit(R.bradley_terry_loss)(rc, rr, margin, center)
    rc64, rr64 = _f64(rc, rr)
    d = rc64 - rr64 - (np.asarray(margin, np.float64) if use_margin else 0)
    want = np.mean([-_log_sigmoid(x) for x in d]) + center * np.mean((rc64 + rr64) ** 2)
    assert _scalar(loss) == pytest.approx(want, rel=RTOL)
    assert _scalar(stats["accuracy"]) == pytest.approx(np.mean(rc64 > rr64))
    assert float(R.bradley_terry_loss(rc, rc)[0]) == pytest.approx(np.log(2), rel=1e-6)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss(loss_type, ls):
    rng = np.random.default_rng(40)
    pc, pr, rc, rr = (rng.normal(size=(4, 16)) * 3 - 20).astype(np.float32)
    beta = 0.1
    fn = jax.jit(functools.partial(R.dpo_loss, loss_type=loss_type, label_smoothing=ls))
    loss, stats = fn(pc, pr, rc, rr, beta)
    pc64, pr64, rc64, rr64 = _f64(pc, pr, rc, rr)
    losses = []
    for i in range(16):
        delta = (pc64[i] - rc64[i]) - (pr64[i] - rr64[i])
        if loss_type == "ipo":
            losses.append((delta - 1 / (2 * beta)) ** 2)
        else:
            losses.append(-(1 - ls) * _log_sigmoid(beta * delta) - ls * _log_sigmoid(-beta * delta))
    assert _scalar(loss) == pytest.approx(np.mean(losses), rel=RTOL)
    ch, rj = beta * (pc64 - rc64), beta * (pr64 - rr64)
    for key, w in [("chosen_rewards", ch.mean()), ("rejected_rewards", rj.mean()),
                   ("reward_accuracy", np.mean(ch > rj)), ("reward_margin", (ch - rj).mean())]:
        assert _scalar(stats[key]) == pytest.approx(w, rel=RTOL, abs=1e-6), key


def test_dpo_closed_forms():
    x = np.full(8, -12.0, np.float32)
    assert float(R.dpo_loss(x, x, x, x, 0.1)[0]) == pytest.approx(np.log(2), rel=1e-6)
    assert float(R.dpo_loss(x, x, x, x, 0.1, label_smoothing=0.3)[0]) == pytest.approx(np.log(2))
    assert float(R.dpo_loss(x, x, x, x, 0.1, "ipo")[0]) == pytest.approx(25.0)
    assert float(R.dpo_loss(x, x, x, x, 0.1)[1]["reward_accuracy"]) == 0
    # d loss / d pc = -beta sigmoid(-beta delta) / batch
    rng = np.random.default_rng(41)
    pc, pr, rc, rr = (rng.normal(size=(4, 8)) - 10).astype(np.float32)
    g = jax.grad(lambda p: R.dpo_loss(p, pr, rc, rr, 0.1)[0])(pc)
    delta = (pc - rc - pr + rr).astype(np.float64)
    _close(g, -0.1 / (1 + np.exp(0.1 * delta)) / 8, atol=1e-8)
    with pytest.raises(ValueError):
        R.dpo_loss(x, x, x, x, 0.1, "hinge")


# --------------------------------------------------------------------------- GRPO, RLOO

@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_advantages(scale_by_std):
    r = np.random.default_rng(42).normal(size=12).astype(np.float32)
    r[8:12] = 0.5                                     # a group with identical rewards -> 0
    fn = jax.jit(R.grpo_advantages, static_argnames=("group_size", "scale_by_std"))
    got = fn(r, group_size=4, scale_by_std=scale_by_std)
    chex.assert_shape(got, (12,))
    chex.assert_type(got, jnp.float32)
    _close(got, ref_grpo_advantages(*_f64(r), 4, scale_by_std, 1e-4))
    np.testing.assert_array_equal(np.asarray(got)[8:], 0.0)
    with pytest.raises(ValueError):
        R.grpo_advantages(r, 5)


def test_rloo_advantages():
    r = np.random.default_rng(43).normal(size=12).astype(np.float32)
    for g in (2, 3, 6):
        got = jax.jit(R.rloo_advantages, static_argnames="group_size")(r, group_size=g)
        (r64,) = _f64(r)
        _close(got, ref_rloo(r64, g))
        grp = r64.reshape(-1, g)
        _close(got, (g / (g - 1) * (grp - grp.mean(1, keepdims=True))).reshape(-1))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_policy_loss(beta):
    m = _mask(44, empty_row=True)
    lp = _data(45, m, 0.3, garbage=np.inf) - 1.0
    old = _data(46, m, 0.3, garbage=-100) - 1.0
    ref = _data(47, m, 0.3, garbage=np.nan) - 1.0
    adv = np.random.default_rng(48).normal(size=B).astype(np.float32)
    ref_arg = ref if beta else None
    fn = jax.jit(R.grpo_policy_loss)
    loss, stats = fn(lp, old, adv, m, 0.2, beta, ref_arg)
    lp64, old64, adv64, ref64 = _f64(lp, old, adv, ref)
    want = ref_grpo_loss(lp64, old64, adv64, m, 0.2, beta, ref64 if beta else None)
    assert _scalar(loss) == pytest.approx(want[0], rel=RTOL)
    assert _scalar(stats["clip_fraction"]) == pytest.approx(want[1], rel=RTOL)
    assert _scalar(stats["kl"]) == pytest.approx(want[2] if beta else 0.0, rel=RTOL, abs=1e-7)
    assert 0 < want[1] < 1
    grad = jax.grad(lambda x: fn(x, old, adv, m, 0.2, beta, ref_arg)[0])(lp)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[m == 0] == 0)
    with pytest.raises(ValueError):
        R.grpo_policy_loss(lp, old, adv, m, 0.2, beta=0.1)


def test_padding_never_leaks():
    """nan/inf in every masked position leaves every result and gradient finite."""
    m = _mask(49)
    bad = functools.partial(_data, mask=m, garbage=np.nan)
    x = bad(50)
    outs = [R.masked_mean(x, m), R.masked_var(x, m), R.masked_whiten(x, m),
            R.gae(x, bad(51), m, 1.0, 0.95), R.per_token_rewards(np.ones(B), x, 0.1, m),
            R.ppo_policy_loss(x, bad(52), bad(53), m, 0.2),
            R.ppo_value_loss(x, bad(54), bad(55), m, 0.2), R.explained_variance(x, bad(56), m),
            R.kl_estimate(x, bad(57), "k3", m), R.sequence_logps(x, m, average=True)]
    for leaf in jax.tree.leaves(outs):
        assert np.all(np.isfinite(leaf))
    g = jax.grad(lambda a: R.ppo_policy_loss(a, bad(52), bad(53), m, 0.2)[0]
                 + jnp.sum(R.gae(a, bad(51), m, 1.0, 0.95)[0]))(x)
    assert np.all(np.isfinite(g))

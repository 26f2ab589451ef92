"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite changes nothing.

Why inside the jitted step and as a select: a `jnp.where` over the new and old state costs one
elementwise pass and no host sync, so the happy path keeps its speed; the loop learns about bad
steps only where it already syncs (log steps), from a small on-device counter (`track`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax.train.failures import NonFiniteError


def keep_if_finite(old_state, new_state, metrics: dict):
    """`(state, metrics)` of a step: `new_state` when its `loss` and `grad_norm` are finite, else
    `old_state`'s params and optimizer state (bitwise; the step counter still advances, so the
    run's step numbering is unchanged). `metrics["nonfinite"]` is 1.0 for a skipped step."""
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    pick = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    state = new_state.replace(
        trainable=jax.tree.map(pick, new_state.trainable, old_state.trainable),
        opt_state=jax.tree.map(pick, new_state.opt_state, old_state.opt_state))
    return state, {**metrics, "nonfinite": (~ok).astype(jnp.float32)}


def initial_health(sharding=None):
    """[consecutive bad steps now, longest run of them since the last check, bad steps in all],
    laid out by `sharding` (the replicated sharding of a run's metrics, so that a multi-process
    run can combine them without moving anything)."""
    return jax.jit(lambda: jnp.zeros(3, jnp.int32), out_shardings=sharding)()


@jax.jit
def _restart_longest(health):
    return health.at[1].set(health[0])


@jax.jit
def track(health, nonfinite):
    """`health` after one more step whose `nonfinite` metric is given; runs on the device, so
    counting costs no host sync."""
    bad = (nonfinite > 0).astype(jnp.int32)
    streak = (health[0] + 1) * bad
    return jnp.stack([streak, jnp.maximum(health[1], streak), health[2] + bad])


def check(health, max_bad_steps: int) -> tuple:
    """Host-side look at the counters, at a log step (where the loop syncs anyway): (health with
    the longest-run counter restarted, bad steps in all, the longest run of consecutive bad
    steps if it reached `max_bad_steps`, else 0)."""
    streak, longest, total = (int(x) for x in jax.device_get(health))
    too_many = longest if max_bad_steps > 0 and longest >= max_bad_steps else 0
    return _restart_longest(health), total, too_many


def host_streak(streak: int, nonfinite_flags) -> tuple[int, int]:
    """(consecutive non-finite updates at the end, the longest such run) after the host-side
    `nonfinite` metrics of several updates in order, continuing a run of `streak` before them.

    For loops that already hold their metrics on the host (PPO and GRPO read every iteration's
    minibatch metrics back to log them), so counting needs no device counter there."""
    longest = streak
    for flag in nonfinite_flags:
        streak = streak + 1 if float(flag) > 0 else 0
        longest = max(longest, streak)
    return streak, longest


def stop_error(longest: int, step: int, max_bad_steps: int, last_good_text: str):
    """The error a run stops with after `longest` consecutive non-finite steps up to `step`."""
    return NonFiniteError(
        f"train: {longest} consecutive steps up to step {step} had a non-finite loss or "
        f"gradient norm (train.max_bad_steps={max_bad_steps}); they were skipped, and the run "
        f"stops at step {step}; {last_good_text}. Lower optim.lr or set optim.clip_norm, then "
        "rerun with --config.checkpoint.allow_changes=optim to resume from it.")

"""Orbax checkpoints under `WORKDIR/checkpoints`: full train state plus the data position.

Orbax writes each step into a temporary folder and renames it only when complete, so a crash or
SIGKILL mid-save leaves the previous checkpoint intact; the unfinished folder is ignored (and
cleaned) by the next run, which resumes from the latest complete step.

Nothing non-finite is ever written (`save` checks first), a write that fails (disk full,
read-only folder, async or not) becomes a `CheckpointWriteError` naming the step and the last
complete checkpoint, and each checkpoint carries a "run" record of what it belongs to
(`ptjax.train.run_record`) that a resume is checked against before any array is read.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ptjax.train.failures import CheckpointWriteError, NonFiniteError, last_good

# What a failed write raises: tensorstore reports errors as ValueError, the file system as OSError.
WRITE_ERRORS = (OSError, ValueError, RuntimeError)


def manager(workdir: str, *, keep: int = 3, async_save: bool = True,
            subdir: str = "checkpoints", best_metric: str = "") -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest `keep` steps, saving in the background; with
    `best_metric` (e.g. "eval/loss"), the `keep` steps with the lowest value of that metric."""
    best = dict(best_fn=lambda m: m[best_metric], best_mode="min") if best_metric else {}
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save,
                                           create=True, **best)
    directory = os.path.abspath(os.path.join(workdir, subdir))
    try:
        return ocp.CheckpointManager(directory, options=options)
    except OSError as e:
        raise CheckpointWriteError(f"cannot create the checkpoint folder {directory}: "
                                   f"{e.strerror or e}") from e


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def check_finite(mngr: ocp.CheckpointManager, step: int, state):
    """Raise `NonFiniteError` when `state` holds a NaN or infinity: a checkpoint must always be
    a state worth resuming from. One reduction and one host sync, only at save steps."""
    if not bool(jax.device_get(_all_finite(state))):
        raise NonFiniteError(f"checkpoint: the state at step {step} holds non-finite values and "
                             f"was not saved; {last_good(str(mngr.directory), latest_step(mngr))}")


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest complete checkpoint's step, as the file system has it now."""
    mngr.reload()
    return mngr.latest_step()


def _write_failed(mngr, step, error) -> CheckpointWriteError:
    detail = str(error).splitlines()[0][:400] if str(error) else type(error).__name__
    return CheckpointWriteError(
        f"checkpoint: could not write step {step} to {mngr.directory} ({detail}); "
        f"{last_good(str(mngr.directory), latest_step(mngr))} and it is intact. Free space or "
        "fix the folder's permissions, then rerun the same command to resume from it.")


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, *, force=False,
         run: dict | None = None, metrics: dict | None = None) -> bool:
    """Start saving `state` (any pytree of arrays), the iterator position and the `run` record
    at `step`; `metrics` feed a best-checkpoint manager.

    Checked finite first (`check_finite`). An earlier async save that failed, or this one,
    raises `CheckpointWriteError`; the previous complete checkpoint stays as it was.
    """
    check_finite(mngr, step, state)
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    if run is not None:
        items["run"] = ocp.args.JsonSave(run)
    try:
        return mngr.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)
    except WRITE_ERRORS as e:
        raise _write_failed(mngr, step, e) from e


def finish(mngr: ocp.CheckpointManager, step: int):
    """Wait for the background save of `step` (the newest) to land and close `mngr`; a failed
    write raises `CheckpointWriteError` here rather than being lost in a log line."""
    try:
        mngr.wait_until_finished()
        mngr.check_for_errors()
    except WRITE_ERRORS as e:
        raise _write_failed(mngr, step, e) from e
    finally:
        mngr.close()


def read_run(mngr: ocp.CheckpointManager, step: int) -> dict | None:
    """The "run" record saved with `step` (None for checkpoints written before it existed)."""
    try:
        return mngr.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except (KeyError, ValueError, FileNotFoundError):
        return None


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """Restore the newest complete checkpoint into the structure, dtypes and shardings of
    `abstract_state` (a pytree of `jax.ShapeDtypeStruct`); returns (step, state, data) or None."""
    step = mngr.latest_step()
    if step is None:
        return None
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return step, restored["state"], restored["data"]


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings describing `tree`, for restoring into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)

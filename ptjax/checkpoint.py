"""Orbax checkpoints under `WORKDIR/checkpoints`: full train state plus the data position.

Orbax writes each step into a temporary folder and renames it only when complete, so a crash or
SIGKILL mid-save leaves the previous checkpoint intact; the unfinished folder is ignored (and
cleaned) by the next run, which resumes from the latest complete step.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, keep: int = 3, async_save: bool = True,
            subdir: str = "checkpoints") -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest `keep` steps, saving in the background."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subdir)), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, *, force=False) -> bool:
    """Start saving `state` (any pytree of arrays) and the iterator position at `step`."""
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)),
                     force=force)


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

"""How a run ends when something goes wrong: one exception type per failure, each with a
message that names the step, what survives and how to go on.

Why exceptions rather than `sys.exit` inside the loop: `train()` is also called from tests and
from recipes that chain stages; they see a typed error they can catch. `launch.py` turns a
`RunFailed` into its message and exit status 1, and `Preempted` into exit status 0.
"""

from __future__ import annotations

import contextlib


class RunFailed(RuntimeError):
    """A run stopped on purpose with a message for the user (exit status 1 from launch.py)."""


class NonFiniteError(RunFailed):
    """Too many consecutive steps had a non-finite loss or gradient norm, or a state about to be
    saved held a non-finite value."""


class CheckpointWriteError(RunFailed):
    """A checkpoint (or an export) could not be written; the previous checkpoint is intact."""


class ResumeMismatch(RunFailed):
    """The workdir's checkpoint belongs to a different run than the one asked for."""


class Preempted(Exception):
    """SIGTERM (or the multi-controller runtime's preemption notice) arrived; every process saved
    the state at `step` and the run should exit 0 so that the scheduler restarts it."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"preempted: saved step {step} to {directory}; rerun the same command "
                         "to resume from there")
        self.step = step
        self.directory = directory


def last_good(directory: str, step: int | None) -> str:
    """How messages name the newest complete checkpoint (or its absence)."""
    if step is None:
        return f"no checkpoint was written yet (in {directory})"
    return f"the last good checkpoint is step {step} in {directory}"


@contextlib.contextmanager
def writing(what: str, directory: str):
    """Turn a failed write under `directory` (disk full, read-only, file too large) into a
    `CheckpointWriteError` that says what was being written; checkpoints are left alone, so the
    same command can be rerun once the cause is fixed."""
    try:
        yield
    except OSError as e:
        raise CheckpointWriteError(
            f"{what}: could not write {e.filename or directory} ({e.strerror or e}); the "
            "checkpoints are intact: fix the cause and rerun the same command") from e

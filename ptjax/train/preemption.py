"""Preemption: SIGTERM (a TPU VM or SLURM job being taken away) saves the state and exits 0.

Why two sources: with several processes, `jax.distributed` runs a preemption service that
catches SIGTERM (or the TPU's maintenance notice) on any process, tells the others and picks one
step at which all of them save (`multihost_utils.reached_preemption_sync_point`, asked once per
step; it reads a flag, no device sync). One process alone has no such service, so a Python
SIGTERM handler sets a flag instead.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


def _sync_manager():
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager


class Watch:
    """Asked after every step: has a preemption notice arrived, and is this the step at which
    every process saves? Use as a context manager (the SIGTERM handler is restored on exit)."""

    def __init__(self):
        self._multi = jax.process_count() > 1 and _sync_manager() is not None
        self._noticed = False
        self._previous = None

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame):
        self._noticed = True

    def reached(self, step: int) -> bool:
        """True at the step where this run should save and stop (the same on every process)."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._noticed

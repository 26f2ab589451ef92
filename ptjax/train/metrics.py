"""Run logging: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, a PNG plot."""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsLog:
    """Append-only metrics for one workdir that stays consistent across resumes.

    On resume from step k, lines logged after k by the interrupted run are dropped first, so the
    file reads exactly like one uninterrupted run. In a multi-process run only process 0
    writes (every process logs the same global metrics); on the others this does nothing.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        import jax

        self.path = os.path.join(workdir, "metrics.jsonl")
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        from tensorboardX import SummaryWriter  # heavy import, only for runs that log

        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict):
        """Record scalars for `step` in both sinks.

        The JSONL stays strict JSON (jq and most readers reject bare `NaN`): a non-finite value
        is written as null and its key listed under "nonfinite"; TensorBoard gets only the
        finite ones.
        """
        if not self._enabled:
            return
        row, bad = strict_row(step, metrics)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k not in ("step", "nonfinite") and k not in bad:
                self._tb.add_scalar(k, v, step)

    def close(self):
        if not self._enabled:
            return
        self._file.close()
        self._tb.close()


def strict_row(step: int, metrics: dict) -> tuple[dict, list]:
    """(JSON-safe row, keys whose values were not finite): those become null and are listed
    under "nonfinite", so a reader tells a diverged value from a missing one."""
    row: dict = {"step": int(step)}
    bad = []
    for k, v in metrics.items():
        value = float(np.asarray(v))
        if not np.isfinite(value):
            bad.append(k)
            value = None
        row[k] = value
    if bad:
        row["nonfinite"] = bad
    return row, bad


def read(workdir: str) -> list[dict]:
    """All rows of a workdir's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str, out_name: str = "loss.png") -> str | None:
    """Plot train (and eval) loss against step into WORKDIR/loss.png; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "eval/loss"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, label=key)
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(workdir, out_name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

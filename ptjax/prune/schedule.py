"""When and how much to prune during fine-tuning: Zhu & Gupta's cubic schedule (1710.01878).

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))^3,   t in {t_0, t_0 + dt, ..., t_0 + n dt}

Sparsity rises fast while the network has redundant weights and slowly near the end, with masks
recomputed every `dt` steps from `start` to `end`; before `start` it is `initial`, after `end`
`final`.
"""

from __future__ import annotations


def sparsity_at(step: int, *, start: int, end: int, every: int, final: float,
                initial: float = 0.0) -> float:
    """The target sparsity at `step` (held constant between mask updates)."""
    if end <= start or every <= 0:
        raise ValueError(f"prune.schedule: needs start < end and every > 0 (got start={start}, "
                         f"end={end}, every={every})")
    if step < start:
        return initial
    if step >= end:
        return final
    t = start + (step - start) // every * every  # the last update at or before `step`
    progress = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def is_update_step(step: int, *, start: int, end: int, every: int) -> bool:
    """Whether the masks are recomputed at `step`."""
    return start <= step <= end and (step - start) % every == 0

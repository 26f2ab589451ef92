"""Over-long examples: cut the prompt from the left, or drop the example; never train on an
example whose loss tokens were all cut away, and say which examples were changed.

Why left: the completion is what an SFT example teaches. Keeping the start of a long example
(the old behaviour) could push the whole completion out of the window, so the example trained on
nothing and nobody was told.
"""

from __future__ import annotations

import os

import numpy as np

POLICIES = ("left", "drop")
NAMED = 5  # how many changed examples a report names


def check_policy(policy: str):
    """A clear error for a `data.truncate` value that is not one of `POLICIES`."""
    if policy not in POLICIES:
        raise ValueError(f"data.truncate: {policy!r} is not one of {POLICIES}")


def fit(ids, mask, max_len: int, policy: str = "left", head: int = 0):
    """`(ids, mask, status)` of one encoded example for a window of `max_len` tokens; status is
    "ok" (fits), "cut" (shortened) or "dropped" (ids and mask are then None).

    "left" removes prompt tokens after the first `head` (the BOS) and before the first loss
    token, keeping one token of context there when there is no BOS; if the loss tokens alone
    still do not fit, their end is cut (the start of the answer is what the prompt leads to).
    "drop" drops any example that does not fit. An example left with no predictable loss token
    (a loss token after position 0) is dropped under either policy.
    """
    check_policy(policy)
    ids, mask = list(ids), list(mask)
    status = "ok"
    if len(ids) > max_len:
        if policy == "drop":
            return None, None, "dropped"
        first = mask.index(True) if True in mask else len(mask)
        hi = first if head else first - 1
        remove = max(0, min(len(ids) - max_len, hi - head))
        ids, mask = ids[:head] + ids[head + remove:], mask[:head] + mask[head + remove:]
        ids, mask, status = ids[:max_len], mask[:max_len], "cut"
    if not any(mask[1:]):
        return None, None, "dropped"
    return np.asarray(ids, np.int32), np.asarray(mask, bool), status


def encode_file(path: str, numbered_records, encode_status, max_len: int, policy: str,
                what: str = "example") -> list:
    """The encoded items of one data file, each fitted by `encode_status(record) -> (item or
    None, status)`; prints the file's report (process 0) and fails when nothing fits.

    `numbered_records` are `(line, record)` pairs, so the report names lines. SFT examples and
    preference pairs (reward models, DPO) share this, so both report the same way."""
    import jax

    from ptjax.data.errors import DataError

    check_policy(policy)
    report = Report(path, max_len, policy)
    items = []
    for line, record in numbered_records:
        item, status = encode_status(record)
        report.add(status, line)
        if item is not None:
            items.append(item)
    if report.message() and jax.process_index() == 0:
        print(report.message(), flush=True)
    if not items:
        raise DataError(path, f"no {what} fits train.seq_len={max_len} tokens with "
                              f"data.truncate={policy}")
    return items


class Report:
    """Counts of cut and dropped examples of one file, with the first few named by line."""

    def __init__(self, source: str, max_len: int, policy: str):
        self.source, self.max_len, self.policy = source, max_len, policy
        self.total = 0
        self.lines: dict[str, list] = {"cut": [], "dropped": []}

    def add(self, status: str, line: int | None):
        """Record one example's `fit` status (`line` in the source file, when known)."""
        self.total += 1
        if status in self.lines:
            self.lines[status].append(line)

    def message(self) -> str:
        """One line per kind of change ("" when every example fit as it was)."""
        parts = []
        name = os.path.basename(str(self.source))
        for status, what in (("cut", "had their prompt cut from the left"),
                             ("dropped", "were dropped")):
            lines = self.lines[status]
            if lines:
                named = ", ".join(f"{name}:{n}" for n in lines[:NAMED] if n is not None)
                more = f" and {len(lines) - NAMED} more" if len(lines) > NAMED else ""
                parts.append(f"{self.source}: {len(lines)} of {self.total} examples {what} to "
                             f"fit {self.max_len} tokens (data.truncate={self.policy})"
                             + (f": {named}{more}" if named else ""))
        return "\n".join(parts)

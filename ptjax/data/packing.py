"""Greedy first-fit packing of variable-length examples into fixed-length rows.

Fixed shapes let the train step compile once; packing several examples per row wastes far less
compute than padding each to `seq_len`. Examples never span rows, and `segment_ids`/`positions`
let attention keep packed examples apart and restart RoPE positions for each.
"""

from __future__ import annotations

import numpy as np


class _FirstFit:
    """Finds the first row with at least `size` free slots in O(log rows).

    A max-tree over the free space of `capacity` candidate rows (all empty at the start, which is
    exactly "open a new row" for first fit). A linear scan would be quadratic in the number of rows,
    too slow for datasets with hundreds of thousands of examples.
    """

    def __init__(self, capacity: int, seq_len: int):
        self.leaves = 1
        while self.leaves < capacity:
            self.leaves *= 2
        self.free = [seq_len] * (2 * self.leaves)

    def place(self, size: int) -> int:
        """Index of the first row with `size` free slots, after taking those slots from it."""
        node = 1
        while node < self.leaves:
            node = 2 * node if self.free[2 * node] >= size else 2 * node + 1
        row = node - self.leaves
        self.free[node] -= size
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return row


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Pack `(ids, loss_mask)` examples, in order, first-fit into `[rows, seq_len]` arrays.

    Returns `inputs`, `targets` (the next token of the same example, 0 where there is none),
    `loss_mask` (float32; 1 where the target is a token the example's mask marks for prediction),
    `segment_ids` (1, 2, ... per example in a row, 0 for padding) and `positions` (within the
    example). Examples longer than `seq_len` are cut to their first `seq_len` tokens; empty ones
    are dropped, as they hold nothing to train on.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    kept = [(ids[:seq_len], mask[:seq_len]) for ids, mask in examples if len(ids) > 0]
    fit = _FirstFit(len(kept), seq_len)
    row_of = [fit.place(len(ids)) for ids, _ in kept]
    rows = max(row_of) + 1 if row_of else 0

    inputs = np.zeros((rows, seq_len), np.int32)
    targets = np.zeros((rows, seq_len), np.int32)
    loss_mask = np.zeros((rows, seq_len), np.float32)
    segment_ids = np.zeros((rows, seq_len), np.int32)
    positions = np.zeros((rows, seq_len), np.int32)
    used = np.zeros(rows, np.int64)  # tokens already placed in each row
    segments = np.zeros(rows, np.int64)  # examples already placed in each row
    for (ids, mask), row in zip(kept, row_of):
        start, n = used[row], len(ids)
        end = start + n
        segments[row] += 1
        inputs[row, start:end] = ids
        targets[row, start : end - 1] = ids[1:]
        loss_mask[row, start : end - 1] = mask[1:]
        segment_ids[row, start:end] = segments[row]
        positions[row, start:end] = np.arange(n)
        used[row] = end
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
    }

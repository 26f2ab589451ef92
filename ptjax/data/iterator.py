"""Deterministic, resumable batches of packed rows, and the fixed batches of an evaluation set."""

from __future__ import annotations

import numpy as np

from ptjax.data.packing import pack


def _batch(rows: dict[str, np.ndarray], start: int, batch_size: int) -> dict[str, np.ndarray]:
    """Rows `start:start + batch_size` as a fresh batch, zero rows filling any shortfall.

    Zero rows have segment id 0 and loss mask 0, so they cost compute but never affect the loss;
    copies keep callers from writing into the cached epoch.
    """
    batch = {}
    for key, array in rows.items():
        part = array[start : start + batch_size]
        if len(part) < batch_size:
            filler = np.zeros((batch_size - len(part),) + array.shape[1:], array.dtype)
            part = np.concatenate([part, filler])
        batch[key] = part.copy()
    return batch


class PackedBatches:
    """An endless stream of `[batch_size, seq_len]` packed batches, the same on every run.

    Epoch e packs the examples in the order `default_rng([seed, e]).permutation(n)` (or as given
    when `shuffle=False`) and cuts the rows into batches, dropping an incomplete last batch unless
    it would be the epoch's only one. Everything follows from `(seed, step)`, so a checkpoint only
    needs `state()` to resume the exact same stream.
    """

    def __init__(
        self,
        examples: list[tuple[np.ndarray, np.ndarray]],
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not any(len(ids) > 0 for ids, _ in examples):
            raise ValueError("PackedBatches needs at least one non-empty example")
        self.examples = list(examples)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._step = 0
        self._batch_counts: dict[int, int] = {}
        self._last_packed: tuple[int, dict[str, np.ndarray]] | None = None
        self._load_epoch(0)
        self._index = 0  # next batch within the current epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the examples."""
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _pack_epoch(self, epoch: int) -> dict[str, np.ndarray]:
        """The packed rows of epoch `epoch`, also recording its batch count.

        The last packed epoch is kept, so `restore` counting an epoch's batches and then resuming
        in it packs it only once.
        """
        if self._last_packed is not None and self._last_packed[0] == epoch:
            return self._last_packed[1]
        rows = pack([self.examples[i] for i in self._epoch_order(epoch)], self.seq_len)
        self._batch_counts[epoch] = max(1, len(rows["inputs"]) // self.batch_size)
        self._last_packed = (epoch, rows)
        return rows

    def _load_epoch(self, epoch: int) -> None:
        """Make `epoch` current, packing it once and caching the rows for its batches."""
        self._epoch = epoch
        self._rows = self._pack_epoch(epoch)

    def _batches_in(self, epoch: int) -> int:
        """How many batches epoch `epoch` yields (packing depends on order, so it can vary)."""
        if epoch not in self._batch_counts:
            self._pack_epoch(epoch)
        return self._batch_counts[epoch]

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches in the current epoch (others may differ slightly: packing depends on order)."""
        return self._batches_in(self._epoch)

    @property
    def tokens_per_epoch(self) -> int:
        """Real (non-padding) tokens in an epoch's packed rows: every example, cut to `seq_len`.

        The dropped incomplete last batch (if any) is counted too, so this is an upper bound on the
        tokens the batches of one epoch deliver.
        """
        return sum(min(len(ids), self.seq_len) for ids, _ in self.examples)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch: `inputs`, `targets`, `loss_mask`, `segment_ids`, `positions`."""
        batch = _batch(self._rows, self._index * self.batch_size, self.batch_size)
        self._index += 1
        self._step += 1
        if self._index == self._batches_in(self._epoch):
            self._load_epoch(self._epoch + 1)
            self._index = 0
        return batch

    def state(self) -> dict:
        """`{"step": batches produced so far}`: all a checkpoint needs to resume this stream."""
        return {"step": self._step}

    def restore(self, state: dict) -> None:
        """Continue as an uninterrupted iterator would after `state["step"]` batches.

        Walks epoch batch counts from the start (packing each skipped epoch once, since the count
        depends on the epoch's order), then packs only the epoch that resumes.
        """
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, remaining = 0, step
        while remaining >= self._batches_in(epoch):
            remaining -= self._batches_in(epoch)
            epoch += 1
        if epoch != self._epoch:
            self._load_epoch(epoch)
        self._index = remaining
        self._step = step


def eval_batches(
    examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Every packed row of `examples`, in order, as batches; the last is filled with zero rows.

    Evaluation must see every example exactly once with the shapes training compiled for, so
    nothing is shuffled or dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = pack(examples, seq_len)
    count = len(rows["inputs"])
    return [_batch(rows, start, batch_size) for start in range(0, count, batch_size)]

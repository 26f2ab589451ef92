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


class RowStream:
    """Packed rows of some of the examples, `rows` at a time, epoch after epoch, the same on
    every run.

    Epoch e packs the examples at `indices` in the order `default_rng([*key, e]).permutation(n)`
    (or as given when `shuffle=False`) and cuts the rows into chunks of `rows`, dropping an
    incomplete last chunk unless it would be the epoch's only one (then zero rows fill it).
    Everything follows from `(key, step)`, so resuming needs only the step. Only the examples at
    `indices` are ever read, so a lazily encoded `examples` is tokenized only there.
    """

    def __init__(self, examples, indices, seq_len: int, rows: int, key: tuple, shuffle: bool):
        self.examples = examples
        self.indices = np.asarray(indices, np.int64)
        self.seq_len = seq_len
        self.rows = rows
        self.key = tuple(key)
        self.shuffle = shuffle
        self._batch_counts: dict[int, int] = {}
        self._last_packed: tuple[int, dict[str, np.ndarray]] | None = None
        self._load_epoch(0)
        self._index = 0  # next chunk within the current epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the stream's examples (positions in `indices`)."""
        if not self.shuffle:
            return np.arange(len(self.indices))
        return np.random.default_rng([*self.key, epoch]).permutation(len(self.indices))

    def _pack_epoch(self, epoch: int) -> dict[str, np.ndarray]:
        """The packed rows of epoch `epoch`, also recording its chunk count.

        The last packed epoch is kept, so `restore` counting an epoch's chunks and then resuming
        in it packs it only once.
        """
        if self._last_packed is not None and self._last_packed[0] == epoch:
            return self._last_packed[1]
        rows = pack([self.examples[self.indices[i]] for i in self._epoch_order(epoch)],
                    self.seq_len)
        self._batch_counts[epoch] = max(1, len(rows["inputs"]) // self.rows)
        self._last_packed = (epoch, rows)
        return rows

    def _load_epoch(self, epoch: int) -> None:
        """Make `epoch` current, packing it once and caching its rows."""
        self._epoch = epoch
        self._rows = self._pack_epoch(epoch)

    def batches_in(self, epoch: int) -> int:
        """How many chunks epoch `epoch` yields (packing depends on order, so it can vary)."""
        if epoch not in self._batch_counts:
            self._pack_epoch(epoch)
        return self._batch_counts[epoch]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def tokens_per_epoch(self) -> int:
        return sum(min(len(self.examples[i][0]), self.seq_len) for i in self.indices)

    def take(self) -> dict[str, np.ndarray]:
        """The next `rows` rows."""
        chunk = _batch(self._rows, self._index * self.rows, self.rows)
        self._index += 1
        if self._index == self.batches_in(self._epoch):
            self._load_epoch(self._epoch + 1)
            self._index = 0
        return chunk

    def restore(self, step: int) -> None:
        """Continue as an uninterrupted stream would after `step` chunks.

        Walks epoch chunk counts from the start (packing each skipped epoch once, since the
        count depends on the epoch's order), then packs only the epoch that resumes.
        """
        epoch, remaining = 0, step
        while remaining >= self.batches_in(epoch):
            remaining -= self.batches_in(epoch)
            epoch += 1
        if epoch != self._epoch:
            self._load_epoch(epoch)
        self._index = remaining


def stream_layout(batch_size: int, streams: int, local_streams=None) -> tuple[int, list[int]]:
    """(rows each row stream gives a batch, the local streams in order), checked: `streams`
    must divide `batch_size`, and the local streams (default: all) be among them. One check
    for training batches, eval batches and the trainer's choice of a process's streams."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if streams < 1 or batch_size % streams:
        raise ValueError(f"data.streams={streams} must be at least 1 and divide the batch "
                         f"size {batch_size}")
    local = list(range(streams)) if local_streams is None else sorted(set(local_streams))
    if not local or not all(0 <= s < streams for s in local):
        raise ValueError(f"local_streams {local} must be among 0..{streams - 1}")
    return batch_size // streams, local


class PackedBatches:
    """An endless stream of `[batch_size, seq_len]` packed batches, the same on every run and
    for any number of processes.

    A batch is `streams` row streams side by side, `batch_size // streams` rows each: example i
    belongs to stream `i % streams`, and each stream shuffles, packs and runs through epochs of
    its own examples (`RowStream`, keyed by `[seed, e]` with one stream, as before streams
    existed, and `[seed, stream, e]` with several). A process builds only its `local_streams`
    (default: all) and leaves the other streams' rows zero: `trainer.to_device` puts only a
    process's own rows on its devices, so in a multi-process run each process reads, tokenizes
    (when `examples` encodes lazily, `LazyExamples`) and packs only its share, while the global
    batch stays a function of `(seed, step, streams)` alone. `state()` is all a checkpoint needs.
    """

    def __init__(
        self,
        examples,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        streams: int = 1,
        local_streams=None,
    ):
        self.rows_per_stream, local = stream_layout(batch_size, streams, local_streams)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.streams = streams
        self._step = 0
        self._streams = {}
        for s in local:
            indices = range(s, len(examples), streams)
            if not any(len(examples[i][0]) > 0 for i in indices):
                where = "" if streams == 1 else f" (stream {s} of data.streams={streams}: " \
                                                 "examples i with i % streams == s)"
                raise ValueError(f"PackedBatches needs at least one non-empty example{where}")
            key = (seed,) if streams == 1 else (seed, s)
            self._streams[s] = RowStream(examples, indices, seq_len, self.rows_per_stream, key,
                                         shuffle)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (the earliest among the local streams)."""
        return min(stream.epoch for stream in self._streams.values())

    @property
    def batches_per_epoch(self) -> int:
        """Batches in the first local stream's current epoch (others may differ slightly:
        packing depends on order)."""
        stream = next(iter(self._streams.values()))
        return stream.batches_in(stream.epoch)

    @property
    def tokens_per_epoch(self) -> int:
        """Real (non-padding) tokens in one epoch of the local streams: every example, cut to
        `seq_len`. The dropped incomplete last batch (if any) is counted too, so this is an
        upper bound on the tokens the batches of one epoch deliver."""
        return sum(stream.tokens_per_epoch for stream in self._streams.values())

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch: `inputs`, `targets`, `loss_mask`, `segment_ids`, `positions`."""
        self._step += 1
        return _side_by_side({s: stream.take() for s, stream in self._streams.items()},
                             self.streams, self.rows_per_stream)

    def state(self) -> dict:
        """`{"step": batches produced so far}`: all a checkpoint needs to resume this stream."""
        return {"step": self._step}

    def restore(self, state: dict) -> None:
        """Continue as an uninterrupted iterator would after `state["step"]` batches."""
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        for stream in self._streams.values():
            stream.restore(step)
        self._step = step


def _side_by_side(parts: dict[int, dict[str, np.ndarray]], streams: int,
                  rows: int) -> dict[str, np.ndarray]:
    """One batch of `streams * rows` rows: stream s's rows at `s * rows`, zero rows for the
    streams not in `parts` (another process's)."""
    if streams == 1:
        return parts[0]
    first = next(iter(parts.values()))
    batch = {k: np.zeros((streams * rows,) + v.shape[1:], v.dtype) for k, v in first.items()}
    for s, part in parts.items():
        for k, v in part.items():
            batch[k][s * rows:(s + 1) * rows] = v
    return batch


class LazyExamples:
    """A sequence of examples encoded on first access (and kept), so a process that packs only
    its row streams tokenizes only their examples.

    `encode(i)` returns `(ids, loss_mask)` or None for an example that does not fit (dropped),
    which becomes an empty example: packing skips it, and the indices of the others, which
    decide their streams, stay where they were.
    """

    def __init__(self, count: int, encode):
        self._count = count
        self._encode = encode
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < self._count:
            raise IndexError(i)
        if i not in self._cache:
            item = self._encode(i)
            self._cache[i] = item if item is not None else (np.zeros(0, np.int32),
                                                             np.zeros(0, bool))
        return self._cache[i]

    def map(self, fn) -> LazyExamples:
        """`fn` applied to each example when it is encoded."""
        return LazyExamples(self._count, lambda i: fn(self[i]))

    @property
    def encoded(self) -> int:
        """How many examples have been encoded so far."""
        return len(self._cache)


def eval_batches(examples, seq_len: int, batch_size: int, streams: int = 1,
                 local_streams=None) -> list[dict[str, np.ndarray]]:
    """Every packed row of `examples`, in order, as batches; the last is filled with zero rows.

    Evaluation must see every example exactly once with the shapes training compiled for, so
    nothing is shuffled or dropped. With several `streams` (as in `PackedBatches`), stream s
    packs examples `s, s + streams, ...` in order into its `batch_size // streams` rows of each
    batch; only `local_streams` (default: all) are built, the other rows stay zero, and the list
    is as long as the longest local stream needs (a multi-process caller pads every process's
    list to the longest: `trainer.pad_to_global_count`).
    """
    per, local = stream_layout(batch_size, streams, local_streams)
    packed = {s: pack([examples[i] for i in range(s, len(examples), streams)], seq_len)
              for s in local}
    count = max(-(-len(rows["inputs"]) // per) for rows in packed.values())
    return [_side_by_side({s: _batch(rows, k * per, per) for s, rows in packed.items()},
                          streams, per) for k in range(count)]

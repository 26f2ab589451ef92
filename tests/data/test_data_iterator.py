import json

import numpy as np
import pytest

from ptjax.data import PackedBatches, eval_batches, pack

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
SEQ_LEN, BATCH = 16, 3


def _examples(count=40, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        n = int(rng.integers(2, 12))
        ids = rng.integers(3, 200, size=n).astype(np.int32)
        ids[0] = 3 + i  # make each example identifiable by its first token
        examples.append((ids, rng.random(n) < 0.5))
    return examples


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in KEYS) and set(a) == set(b) == set(KEYS)


def _first_tokens(batch):
    """First token of every example in a batch (the example's identity in `_examples`)."""
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    return batch["inputs"][starts].tolist()


def test_batches_shape_and_determinism():
    examples = _examples()
    a = PackedBatches(examples, SEQ_LEN, BATCH, seed=7)
    b = PackedBatches(examples, SEQ_LEN, BATCH, seed=7)
    c = PackedBatches(examples, SEQ_LEN, BATCH, seed=8)
    n = 3 * a.batches_per_epoch + 1
    batches_a, batches_b, batches_c = _take(a, n), _take(b, n), _take(c, n)
    for batch in batches_a:
        assert set(batch) == set(KEYS)
        assert all(batch[k].shape == (BATCH, SEQ_LEN) for k in KEYS)
    assert all(_equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not all(_equal(x, y) for x, y in zip(batches_a, batches_c))


def test_epochs_follow_the_specified_permutation():
    examples = _examples()
    it = PackedBatches(examples, SEQ_LEN, BATCH, seed=3)
    seen_orders = []
    for epoch in range(3):
        assert it.epoch == epoch
        order = np.random.default_rng([3, epoch]).permutation(len(examples))
        rows = pack([examples[i] for i in order], SEQ_LEN)
        count = len(rows["inputs"]) // BATCH
        assert it.batches_per_epoch == count
        batches = _take(it, count)
        for b, batch in enumerate(batches):
            for k in KEYS:
                np.testing.assert_array_equal(batch[k], rows[k][b * BATCH : (b + 1) * BATCH])
        seen_orders.append([t for batch in batches for t in _first_tokens(batch)])
    assert it.epoch == 3  # the next batch comes from epoch 3
    assert seen_orders[0] != seen_orders[1] and seen_orders[1] != seen_orders[2]
    # Only the dropped last incomplete batch can hide examples: each epoch sees most of them, once.
    for order in seen_orders:
        assert len(order) == len(set(order)) > len(examples) // 2


def test_unshuffled_first_epoch_is_the_given_order():
    examples = _examples()
    it = PackedBatches(examples, SEQ_LEN, BATCH, seed=0, shuffle=False)
    rows = pack(examples, SEQ_LEN)
    first, second = _take(it, it.batches_per_epoch), None
    np.testing.assert_array_equal(
        np.concatenate([b["inputs"] for b in first]), rows["inputs"][: len(first) * BATCH]
    )
    second = _take(it, len(first))
    assert all(_equal(x, y) for x, y in zip(first, second))
    assert it.tokens_per_epoch == sum(len(ids) for ids, _ in examples)


@pytest.mark.parametrize("shuffle", [True, False])
def test_restore_resumes_exactly(shuffle):
    examples = _examples()
    reference = PackedBatches(examples, SEQ_LEN, BATCH, seed=11, shuffle=shuffle)
    per_epoch = reference.batches_per_epoch
    total = 3 * per_epoch + 4
    expected = _take(reference, total)
    assert reference.state() == {"step": total}

    resumed = PackedBatches(examples, SEQ_LEN, BATCH, seed=11, shuffle=shuffle)
    _take(resumed, 5)  # restoring must also work backwards from an advanced iterator
    for k in [0, 1, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch, total - 3]:
        state = json.loads(json.dumps({"step": k}))
        fresh = PackedBatches(examples, SEQ_LEN, BATCH, seed=11, shuffle=shuffle)
        fresh.restore(state)
        resumed.restore(state)
        for i in range(3):
            assert _equal(next(fresh), expected[k + i]), (k, i)
            assert _equal(next(resumed), expected[k + i]), (k, i)
        assert fresh.state() == {"step": k + 3}


def test_tiny_dataset_pads_with_zero_rows():
    examples = _examples(count=3)
    it = PackedBatches(examples, seq_len=64, batch_size=4, seed=0)
    assert it.batches_per_epoch == 1
    for _ in range(3):
        batch = next(it)
        assert (batch["segment_ids"][1:] == 0).all()  # one real row, three zero rows
        for k in KEYS:
            assert not batch[k][1:].any()
        assert sorted(_first_tokens(batch)) == [3, 4, 5]
        assert (batch["segment_ids"] > 0).sum() == it.tokens_per_epoch


def test_invalid_arguments():
    with pytest.raises(ValueError):
        PackedBatches([], 8, 2, seed=0)
    with pytest.raises(ValueError):
        PackedBatches(_examples(3), 8, 0, seed=0)


def test_eval_batches_cover_every_example_once():
    examples = _examples(count=25)
    batches = eval_batches(examples, SEQ_LEN, BATCH)
    rows = pack(examples, SEQ_LEN)
    count = len(rows["inputs"])
    assert len(batches) == -(-count // BATCH)
    assert all(b[k].shape == (BATCH, SEQ_LEN) for b in batches for k in KEYS)
    stacked = {k: np.concatenate([b[k] for b in batches]) for k in KEYS}
    for k in KEYS:
        np.testing.assert_array_equal(stacked[k][:count], rows[k])
        assert not stacked[k][count:].any()
    order = [t for b in batches for t in _first_tokens(b)]
    assert sorted(order) == [3 + i for i in range(25)]
    assert eval_batches([], SEQ_LEN, BATCH) == []


def _example_ids(batch, rows=slice(None)):
    """Identities (index in `_examples`) of the examples starting in the given rows."""
    sub = {k: v[rows] for k, v in batch.items()}
    return [t - 3 for t in _first_tokens(sub)]


def test_row_streams_give_one_global_batch_however_the_streams_are_split():
    """Two 'processes' building streams {0, 1} and {2, 3} of four together make exactly the
    batches of one builder of all four; each stream holds only examples i with i % 4 == s."""
    examples = _examples(60)
    whole = PackedBatches(examples, SEQ_LEN, 8, seed=5, streams=4)
    first = PackedBatches(examples, SEQ_LEN, 8, seed=5, streams=4, local_streams=[0, 1])
    second = PackedBatches(examples, SEQ_LEN, 8, seed=5, streams=4, local_streams=[3, 2])
    for _ in range(25):  # several epochs of every stream
        w, a, b = next(whole), next(first), next(second)
        for k in KEYS:
            np.testing.assert_array_equal(a[k][:4], w[k][:4])
            np.testing.assert_array_equal(b[k][4:], w[k][4:])
            assert not a[k][4:].any() and not b[k][:4].any()  # another process's rows: zero
        for s in range(4):
            assert all(i % 4 == s for i in _example_ids(w, slice(2 * s, 2 * s + 2)))
    # streams are shuffled independently of one another and of the one-stream order
    one = PackedBatches(examples, SEQ_LEN, 8, seed=5)
    assert not _equal(next(one), next(PackedBatches(examples, SEQ_LEN, 8, seed=5, streams=4)))


def test_row_streams_resume_and_touch_only_their_examples():
    from ptjax.data import LazyExamples

    examples = _examples(60)
    whole = PackedBatches(examples, SEQ_LEN, 6, seed=2, streams=3)
    batches = _take(whole, 30)
    encoded = []
    lazy = LazyExamples(len(examples), lambda i: encoded.append(i) or examples[i])
    resumed = PackedBatches(lazy, SEQ_LEN, 6, seed=2, streams=3, local_streams=[1])
    resumed.restore({"step": 17})
    for want in batches[17:]:
        got = next(resumed)
        for k in KEYS:
            np.testing.assert_array_equal(got[k][2:4], want[k][2:4])
    assert sorted(set(encoded)) == list(range(1, 60, 3))  # stream 1's examples, nothing else
    assert lazy.encoded == 20 and resumed.state() == {"step": 30}


def test_eval_row_streams_cover_every_example_once():
    examples = _examples(37)
    full = eval_batches(examples, SEQ_LEN, 4, streams=2)
    parts = [eval_batches(examples, SEQ_LEN, 4, streams=2, local_streams=[s]) for s in (0, 1)]
    ids = sorted(i for b in full for i in _example_ids(b))
    assert ids == list(range(37))
    assert len(full) == max(len(p) for p in parts)
    for s, part in enumerate(parts):
        for k, batch in enumerate(part):
            rows = slice(2 * s, 2 * s + 2)
            for key in KEYS:
                np.testing.assert_array_equal(batch[key][rows], full[k][key][rows])
    # the loss-bearing tokens are exactly those of the examples (nothing lost, nothing twice)
    assert sum(int(b["loss_mask"].sum()) for b in full) == sum(
        int(m[1:].sum()) for _, m in examples)


def test_row_streams_refuse_a_bad_split():
    examples = _examples(5)
    with pytest.raises(ValueError, match="data.streams=3 must"):
        PackedBatches(examples, SEQ_LEN, 8, seed=0, streams=3)
    with pytest.raises(ValueError, match="stream 5 of data.streams=8"):
        PackedBatches(examples, SEQ_LEN, 8, seed=0, streams=8)

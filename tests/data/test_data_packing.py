import numpy as np
import pytest

from ptjax.data import pack

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def _random_examples(rng, count, seq_len):
    examples = []
    for _ in range(count):
        n = int(rng.integers(1, seq_len + 6))  # some longer than seq_len
        ids = rng.integers(3, 50, size=n).astype(np.int32)
        mask = rng.random(n) < 0.6
        examples.append((ids, mask))
    return examples


def _reference_first_fit(lengths, seq_len):
    """Row of each example by a plain linear scan over the open rows."""
    free, rows = [], []
    for n in lengths:
        for r, room in enumerate(free):
            if room >= n:
                break
        else:
            free.append(seq_len)
            r = len(free) - 1
        free[r] -= n
        rows.append(r)
    return rows


def test_small_case_exactly():
    ex = [
        (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], bool)),
        (np.array([20, 21, 22]), np.array([0, 1, 1], bool)),
        (np.array([30, 31]), np.array([1, 1], bool)),
    ]
    out = pack(ex, seq_len=6)
    # First fit: example 2 goes back into row 0 behind example 0.
    np.testing.assert_array_equal(out["inputs"], [[10, 11, 12, 13, 30, 31], [20, 21, 22, 0, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[11, 12, 13, 0, 31, 0], [21, 22, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
    assert out["inputs"].dtype == np.int32 and out["targets"].dtype == np.int32
    assert out["loss_mask"].dtype == np.float32
    assert out["segment_ids"].dtype == np.int32 and out["positions"].dtype == np.int32


@pytest.mark.parametrize("seed,seq_len,count", [(0, 16, 40), (1, 7, 25), (2, 64, 300)])
def test_pack_matches_brute_force_reference(seed, seq_len, count):
    rng = np.random.default_rng(seed)
    examples = _random_examples(rng, count, seq_len)
    out = pack(examples, seq_len)
    rows = out["inputs"].shape[0]
    assert all(out[k].shape == (rows, seq_len) for k in KEYS)

    truncated = [(ids[:seq_len], mask[:seq_len]) for ids, mask in examples]
    expected_rows = _reference_first_fit([len(ids) for ids, _ in truncated], seq_len)
    assert rows == max(expected_rows) + 1

    # Rebuild every example from the packed rows, row by row and segment by segment.
    rebuilt = {r: [] for r in range(rows)}
    for r in range(rows):
        seg = out["segment_ids"][r]
        used = seg > 0
        # Real tokens come first, then padding; padding is all zeros in every array.
        assert used.tolist() == sorted(used.tolist(), reverse=True)
        for k in KEYS:
            assert not out[k][r][~used].any()
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert len(where) > 0 and np.all(np.diff(where) == 1)  # contiguous
            ids = out["inputs"][r, where]
            np.testing.assert_array_equal(out["positions"][r, where], np.arange(len(where)))
            np.testing.assert_array_equal(out["targets"][r, where[:-1]], ids[1:])
            assert out["targets"][r, where[-1]] == 0
            assert out["loss_mask"][r, where[-1]] == 0
            rebuilt[r].append((ids, out["loss_mask"][r, where[:-1]]))

    # Each row holds exactly the examples first fit assigns it, in input order.
    for r in range(rows):
        originals = [truncated[i] for i, er in enumerate(expected_rows) if er == r]
        assert len(rebuilt[r]) == len(originals)
        for (ids, shifted_mask), (orig_ids, orig_mask) in zip(rebuilt[r], originals):
            np.testing.assert_array_equal(ids, orig_ids)
            np.testing.assert_array_equal(shifted_mask, orig_mask[1:].astype(np.float32))

    assert out["loss_mask"].sum() == sum(mask[1:].sum() for _, mask in truncated)
    assert (out["segment_ids"] > 0).sum() == sum(len(ids) for ids, _ in truncated)


def test_empty_inputs():
    out = pack([], seq_len=8)
    assert all(out[k].shape == (0, 8) for k in KEYS)
    out = pack([(np.zeros(0, np.int32), np.zeros(0, bool)), (np.array([5]), np.array([True]))], 4)
    np.testing.assert_array_equal(out["inputs"], [[5, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 0, 0, 0]])
    assert out["loss_mask"].sum() == 0  # a one-token example has nothing to predict


def test_sequence_length_bounds():
    rows = pack([(np.array([5, 6]), np.array([0, 1], bool))], 1)  # one token per row
    np.testing.assert_array_equal(rows["inputs"], [[5]])
    assert rows["loss_mask"].sum() == 0  # nothing left to predict inside the row
    with pytest.raises(ValueError, match="seq_len must be at least 1, got 0"):
        pack([(np.array([5, 6]), np.array([0, 1], bool))], 0)

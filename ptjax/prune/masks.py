"""Pruning masks for [in, out] kernels: magnitude (per layer or global), random, and N:M.

A mask is a boolean array beside the weight (True = kept). Every criterion keeps an exact count:
ties in a score are broken by position, so a 50% mask of a [64, 32] kernel keeps exactly 1,024
weights whatever the values, which is what a sparsity report and 2:4 hardware rely on.
"""

from __future__ import annotations

import numpy as np


def keep_count(size: int, sparsity: float) -> int:
    """How many of `size` weights a `sparsity` fraction leaves (pruned count rounded down)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"prune.sparsity: {sparsity} is not in [0, 1]")
    return size - int(np.floor(size * sparsity + 1e-9))


def top_k_mask(scores: np.ndarray, keep: int) -> np.ndarray:
    """True at the `keep` largest scores (the earlier position wins a tie)."""
    flat = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, bool)
    mask[order[:keep]] = True
    return mask.reshape(np.shape(scores))


def magnitude(w, sparsity: float) -> np.ndarray:
    """Keep the largest |w| of this weight."""
    w = np.asarray(w, np.float32)
    return top_k_mask(np.abs(w), keep_count(w.size, sparsity))


def per_output(scores, sparsity: float) -> np.ndarray:
    """Keep the largest scores of each output column (each row of PyTorch's [out, in]):
    how Wanda and SparseGPT compare weights, within one output at a time."""
    scores = np.asarray(scores, np.float64)
    keep = keep_count(scores.shape[0], sparsity)
    order = np.argsort(-scores, axis=0, kind="stable")
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order[:keep], True, axis=0)
    return mask


def random_scores(shape, seed: int) -> np.ndarray:
    """Uniform random importance: the baseline criterion the others must beat (any structure)."""
    return np.random.default_rng(seed).random(shape)


def random(shape, sparsity: float, seed: int) -> np.ndarray:
    """A uniformly random mask with the exact kept count."""
    return top_k_mask(random_scores(shape, seed), keep_count(int(np.prod(shape)), sparsity))


def n_of_m(scores, n: int = 2, m: int = 4) -> np.ndarray:
    """N:M structure along the input dimension: in every group of `m` consecutive input rows of
    each output column, keep the `n` highest scores (2:4 is what sparse tensor cores run)."""
    scores = np.asarray(scores, np.float64)
    n_in, n_out = scores.shape
    if n_in % m:
        raise ValueError(f"prune.structure: {n}:{m} needs the input dimension ({n_in}) to be a "
                         f"multiple of {m}")
    groups = scores.reshape(n_in // m, m, n_out)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    return mask.reshape(n_in, n_out)


def global_magnitude(weights: dict, sparsity: float) -> dict:
    """One |w| threshold over all the given weights (path -> array): layers that matter less
    lose more. Exact total count, ties broken by (path order, position)."""
    paths = list(weights)
    flat = np.concatenate([np.abs(np.asarray(weights[p], np.float32)).reshape(-1) for p in paths])
    keep = top_k_mask(flat, keep_count(flat.size, sparsity))
    out, start = {}, 0
    for p in paths:
        size = np.size(weights[p])
        out[p] = keep[start:start + size].reshape(np.shape(weights[p]))
        start += size
    return out

"""An inverted-file (IVF) approximate index in JAX: k-means lists, search of the nearest few.

k-means (Lloyd's algorithm, on a sample) cuts the embedding space into `lists` cells; every row
is assigned to its nearest centroid and the rows are stored grouped by cell, so each cell is one
contiguous block. A query scores the centroids, probes its `nprobe` best cells and ranks only
their rows: about nprobe/lists of the exact search's work, at the price of missing neighbours
that fell in cells it did not probe (recall, measured against `search.exact_topk`). With
nprobe = lists it searches every row and equals the exact search.

Why not `jax.lax.approx_max_k`: on CPU it is exact (a full sort), so it saves nothing there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ptjax.rag.search import F32, merge_topk, scores_against


@dataclasses.dataclass(frozen=True)
class IVFLayout:
    """Where each cell's rows are in an embedding matrix stored grouped by cell.

    `centroids` [lists, d] float32; `offsets` [lists + 1] int32: cell c holds rows
    offsets[c] .. offsets[c+1]-1; `order` [n] int32: the original row of each stored row.
    """

    centroids: np.ndarray
    offsets: np.ndarray
    order: np.ndarray

    @property
    def lists(self) -> int:
        return len(self.centroids)

    @property
    def max_list(self) -> int:
        return int(np.max(np.diff(self.offsets)))


def _nearest(x, centroids):
    """Index of the nearest centroid (squared L2) of each row; `|x|^2` is the same for every
    centroid, so it is `argmax(x.c - |c|^2 / 2)`."""
    half_norms = 0.5 * jnp.sum(centroids * centroids, axis=1)
    return jnp.argmax(scores_against(x, centroids.astype(x.dtype)) - half_norms, axis=1)


@functools.partial(jax.jit, static_argnames=("lists", "iterations"))
def kmeans(sample, key, lists: int, iterations: int = 20):
    """Centroids [lists, d] float32 of `sample` [s, d] after Lloyd iterations from `lists`
    distinct sample rows; a cell left empty keeps its previous centroid."""
    x = sample.astype(F32)
    start = jax.random.choice(key, x.shape[0], (lists,), replace=False)

    def step(centroids, _):
        cell = _nearest(x, centroids)
        sums = jax.ops.segment_sum(x, cell, lists)
        counts = jax.ops.segment_sum(jnp.ones(x.shape[0], F32), cell, lists)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None],
                         centroids), None

    centroids, _ = lax.scan(step, x[start], None, length=iterations)
    return centroids


_assign = jax.jit(_nearest)


def build_layout(embeddings: np.ndarray, lists: int, *, sample: int = 65536, iterations: int = 20,
                 seed: int = 0, chunk: int = 65536) -> IVFLayout:
    """k-means on `sample` random rows, then every row assigned to its cell (a chunk at a time).

    Why a sample: Lloyd's iterations over a million rows would dominate the build; centroids
    from 64 rows per cell are about as good for routing queries.
    """
    n = embeddings.shape[0]
    if not 0 < lists <= n:
        raise ValueError(f"lists must be in 1..{n} (the corpus size), got {lists}")
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(n, min(max(sample, lists), n), replace=False))
    centroids = kmeans(jnp.asarray(embeddings[take]), jax.random.key(seed), lists, iterations)
    cells = np.concatenate([np.asarray(_assign(jnp.asarray(embeddings[i:i + chunk]), centroids))
                            for i in range(0, n, chunk)])
    order = np.argsort(cells, kind="stable").astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(cells, minlength=lists))])
    return IVFLayout(np.asarray(centroids, np.float32), offsets.astype(np.int32), order)


@functools.partial(jax.jit, static_argnames=("k", "nprobe", "block"))
def ivf_topk(queries, embeddings, centroids, offsets, k: int, nprobe: int, block: int = 256):
    """`(scores [q, k] float32, rows [q, k] int32)` over the rows of the `nprobe` cells whose
    centroids score highest against each query; `embeddings` are stored grouped by cell
    (`IVFLayout`), rows are positions in that order. Fewer than k candidates leave -inf / -1.

    Each probed cell is read in `block`-row slices (the last slid back at the end of the
    matrix, rows outside the cell masked out), so the work follows the cell's real size, not
    the largest cell's; each slice's top k merges into the query's running top k, one query at
    a time: plain slices of the matrix, never a gather (XLA's CPU gather of rows is slow).
    The query is padded to 8 rows, because XLA's CPU dot with one row takes a matrix-vector
    path up to 8x slower.
    """
    n, d = embeddings.shape
    block = min(block, n)
    per_block = min(k, block)
    _, probe = lax.top_k(scores_against(queries, centroids), nprobe)  # [q, nprobe]
    starts, ends = offsets[probe], offsets[probe + 1]

    def one(args):
        query, first, last = args
        padded = jnp.zeros((8, d), queries.dtype).at[0].set(query)

        def scan_block(b, carry, start, end):
            lo = start + b * block
            at = jnp.minimum(lo, n - block)
            rows = at + jnp.arange(block, dtype=jnp.int32)
            s = scores_against(padded, lax.dynamic_slice_in_dim(embeddings, at, block, 0))[:1]
            s = jnp.where((rows >= lo) & (rows < end), s, -jnp.inf)
            top, pos = lax.top_k(s, per_block)
            return merge_topk(*carry, top, rows[pos], k)

        def cell(j, carry):
            start, end = first[j], last[j]
            blocks = (end - start + block - 1) // block
            return lax.fori_loop(0, blocks, lambda b, c: scan_block(b, c, start, end), carry)

        init = (jnp.full((1, k), -jnp.inf, F32), jnp.full((1, k), -1, jnp.int32))
        top, rows = lax.fori_loop(0, nprobe, cell, init)
        return top[0], jnp.where(jnp.isfinite(top[0]), rows[0], -1)

    return lax.map(one, (queries, starts, ends))


def recall(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Fraction of the exact top-k rows found in the approximate top-k (per query, averaged):
    recall@k of an approximate index against the exact search."""
    approx_rows, exact_rows = np.asarray(approx_rows), np.asarray(exact_rows)
    hits = [len(set(a.tolist()) & set(e.tolist())) / len(e)
            for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits))

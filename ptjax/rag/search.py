"""Exact maximum-inner-product top-k over an embedding matrix, on one device or sharded by rows.

Scores are `queries @ embeddings.T` computed a chunk of rows at a time with a running top-k
merge, so memory stays `queries x chunk` however large the corpus is (a 1M-row score matrix for
64 queries would be 256 MB; a chunk of 64k rows is 16 MB). Ties go to the lower row: XLA's
top-k is stable and the running best (earlier rows) always comes first in each merge, so results
are deterministic and equal to a float64 brute force sorted by (-score, row).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

F32 = jnp.float32
DEFAULT_CHUNK = 65536


def merge_topk(best_scores, best_rows, scores, rows, k: int):
    """The top k of two candidate sets [q, a] and [q, b]; on ties the first set's entries win."""
    s = jnp.concatenate([best_scores, scores], axis=1)
    r = jnp.concatenate([best_rows, rows], axis=1)
    top, pos = lax.top_k(s, k)
    return top, jnp.take_along_axis(r, pos, axis=1)


def scores_against(queries, block):
    """float32 inner products [q, rows] of queries with a block of embedding rows, the operands in
    the block's dtype (bf16 embeddings: bf16 products, f32 accumulation)."""
    return lax.dot_general(queries.astype(block.dtype), block, (((1,), (1,)), ((), ())),
                           preferred_element_type=F32)


def even_chunk(n: int, chunk: int) -> int:
    """The largest divisor of n in [chunk / 2, chunk], or 0 when there is none."""
    return next((c for c in range(min(chunk, n), max(chunk // 2, 1) - 1, -1) if n % c == 0), 0)


def chunked_topk(queries, embeddings, k: int, chunk: int, row_offset=0, valid_rows=None):
    """`(scores [q, k] f32, rows [q, k] int32)`: the un-jitted body of `exact_topk`.

    Rows are numbered from `row_offset` (a shard's first global row); rows numbered `valid_rows`
    or above score -inf (padding added to split the corpus evenly over devices). When a chunk
    size near `chunk` divides the rows, the chunks run as a `lax.scan` over a [chunks, chunk, d]
    view of the matrix (a free reshape); otherwise a loop slices one chunk per step (a copy of
    it), the last slid back to end at the last row with the rows it repeats masked out. On the
    2-core CPU the scan was 1.5-2x faster (bfloat16 most), so even sizes are worth choosing.
    """
    n, d = embeddings.shape
    chunk = min(chunk, n)
    if k > chunk:
        raise ValueError(f"k={k} exceeds the {chunk} rows searched per chunk")
    q = queries.shape[0]
    init = (jnp.full((q, k), -jnp.inf, F32), jnp.full((q, k), -1, jnp.int32))

    def merge_block(carry, block, first, keep=None):
        rows = first + jnp.arange(block.shape[0], dtype=jnp.int32)
        keep = jnp.ones(block.shape[0], bool) if keep is None else keep
        if valid_rows is not None:
            keep &= rows + row_offset < valid_rows
        s = jnp.where(keep[None, :], scores_against(queries, block), -jnp.inf)
        top, pos = lax.top_k(s, k)
        return merge_topk(*carry, top, rows[pos] + row_offset, k)

    even = even_chunk(n, chunk) if k <= chunk // 2 else 0
    if even:
        def step(carry, xs):
            block, c = xs
            return merge_block(carry, block, c * even), None

        blocks = embeddings.reshape(n // even, even, d)
        return lax.scan(step, init, (blocks, jnp.arange(n // even, dtype=jnp.int32)))[0]

    def body(c, carry):
        start = jnp.minimum(c * chunk, n - chunk)
        block = lax.dynamic_slice_in_dim(embeddings, start, chunk, axis=0)
        seen = start + jnp.arange(chunk, dtype=jnp.int32) < c * chunk
        return merge_block(carry, block, start, ~seen)

    return lax.fori_loop(0, math.ceil(n / chunk), body, init)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def exact_topk(queries, embeddings, k: int, chunk: int = DEFAULT_CHUNK):
    """`(scores [q, k] float32, rows [q, k] int32)` of the k rows of `embeddings` [n, d] with the
    largest inner product with each query [q, d], best first, ties to the lower row.

    Why chunked: the full score matrix of a large corpus does not fit in cache (or memory); a
    chunk's scores are reduced to k candidates before the next chunk is read.
    """
    if not 0 < k <= embeddings.shape[0]:
        raise ValueError(f"k must be in 1..{embeddings.shape[0]} (the corpus size), got {k}")
    return chunked_topk(queries, embeddings, k, chunk)


def shard_rows(embeddings: np.ndarray, mesh, axes: tuple[str, ...] | None = None):
    """(embeddings padded with zero rows to a multiple of the mesh's size and placed with rows
    split over `axes` (default: every mesh axis), the number of real rows).

    Why: a corpus too large for one device's memory, or searched faster by all of them, lives as
    one row block per device; `sharded_topk` searches each block where it lies.
    """
    axes = tuple(mesh.axis_names) if axes is None else tuple(axes)
    devices = math.prod(mesh.shape[a] for a in axes)
    n = embeddings.shape[0]
    padded = -(-n // devices) * devices
    if padded != n:
        embeddings = np.concatenate(
            [embeddings, np.zeros((padded - n, embeddings.shape[1]), embeddings.dtype)])
    return jax.device_put(embeddings, NamedSharding(mesh, P(axes, None))), n


@functools.partial(jax.jit, static_argnames=("k", "mesh", "axes", "valid_rows", "chunk"))
def sharded_topk(queries, embeddings, k: int, mesh, axes: tuple[str, ...] | None = None,
                 valid_rows: int | None = None, chunk: int = DEFAULT_CHUNK):
    """`exact_topk` over embeddings whose rows are split over the mesh axes `axes` (as
    `shard_rows` places them): each device finds its block's top k, the candidates
    (devices x k per query, a few KB) are gathered, and one more top-k merges them.

    The result equals `exact_topk` on the whole matrix, ties included: blocks are in row order,
    so the gathered candidates are too, and the stable merge keeps the lower row.
    """
    axes = tuple(mesh.axis_names) if axes is None else tuple(axes)
    n = embeddings.shape[0]
    valid_rows = n if valid_rows is None else valid_rows
    devices = math.prod(mesh.shape[a] for a in axes)
    local_n = n // devices
    if not 0 < k <= min(local_n, valid_rows):
        raise ValueError(f"k must be in 1..{min(local_n, valid_rows)} (rows per device and in "
                         f"the corpus), got {k}")

    def local(q, block):
        shard = lax.axis_index(axes)
        s, r = chunked_topk(q, block, k, chunk, row_offset=shard * local_n,
                            valid_rows=valid_rows)
        s = lax.all_gather(s, axes, axis=1, tiled=True)  # [q, devices * k], shard order
        r = lax.all_gather(r, axes, axis=1, tiled=True)
        top, pos = lax.top_k(s, k)
        return top, jnp.take_along_axis(r, pos, axis=1)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes, None)), out_specs=(P(), P()),
                         check_vma=False)(queries, embeddings)

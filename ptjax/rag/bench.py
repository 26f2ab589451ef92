"""Retrieval benchmark: top-10 of 64 queries over 1M x 512 embeddings, exact and IVF.

    python -m ptjax.rag.bench                      # 1M x 512, float32 and bfloat16 storage
    python -m ptjax.rag.bench --rows=200000 --lists=512 --nprobe=4,16,64 --dtype=float32

The corpus is random but clustered, like real embeddings (unit vectors around `--clusters`
centres; each query a corpus row plus noise), so an IVF index has structure to exploit and its
recall is meaningful. Prints one JSON object per case: seconds per 64-query batch (median of
`--repeats` after a warm-up call), recall@k against the exact search over the same stored
matrix, and for IVF the build time (k-means on a sample plus assignment of every row).
"""

import sys

from ptjax import runtime

runtime.reexec_with_fast_allocator()  # must happen before JAX starts

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from ptjax.rag import ivf, search  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 1_000_000, "Corpus rows.")
flags.DEFINE_integer("dim", 512, "Embedding width.")
flags.DEFINE_integer("queries", 64, "Queries per batch.")
flags.DEFINE_integer("k", 10, "Results per query.")
flags.DEFINE_integer("clusters", 1000, "Centres the corpus is drawn around.")
flags.DEFINE_float("noise", 1.0, "Spread of rows around their centre (per-coordinate std, "
                   "relative to the centre's).")
flags.DEFINE_list("dtype", ["float32", "bfloat16"], "Storage dtypes of the embedding matrix.")
flags.DEFINE_integer("lists", 1024, "IVF cells (0: skip IVF).")
flags.DEFINE_list("nprobe", ["4", "8", "16", "32"], "IVF cells probed per query.")
flags.DEFINE_integer("block", 256, "IVF rows scored per step within a cell.")
flags.DEFINE_integer("repeats", 5, "Timed calls per case (median reported).")
flags.DEFINE_integer("seed", 0, "Data seed.")


def clustered(rows: int, dim: int, clusters: int, noise: float, seed: int,
              chunk: int = 65536) -> np.ndarray:
    """Unit vectors [rows, dim] float32 around random centres, made a chunk at a time so the
    float64 intermediates stay small."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x = centres[rng.integers(clusters, size=n)]
        x += noise * rng.standard_normal((n, dim), dtype=np.float32)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed(fn, *args, repeats: int):
    """(median seconds of `repeats` calls after one warm-up call, the last result)."""
    result = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), result


def main(argv):
    del argv
    t = time.perf_counter()
    corpus = clustered(FLAGS.rows, FLAGS.dim, FLAGS.clusters, FLAGS.noise, FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed + 1)
    queries = corpus[rng.choice(FLAGS.rows, FLAGS.queries, replace=False)]
    jitter = rng.standard_normal(queries.shape, dtype=np.float32)
    queries = queries + FLAGS.noise * jitter / np.sqrt(FLAGS.dim)
    queries = jnp.asarray(queries / np.linalg.norm(queries, axis=1, keepdims=True))
    print(json.dumps({"case": "data", "rows": FLAGS.rows, "dim": FLAGS.dim,
                      "queries": FLAGS.queries, "k": FLAGS.k, "seconds_to_make":
                      round(time.perf_counter() - t, 1), "devices": jax.device_count(),
                      "backend": jax.default_backend()}), flush=True)
    layout = None
    if FLAGS.lists:
        t = time.perf_counter()
        layout = ivf.build_layout(corpus, FLAGS.lists, seed=FLAGS.seed)
        build = time.perf_counter() - t
        corpus = corpus[layout.order]  # stored grouped by cell; the exact search reads the same
        sizes = np.diff(layout.offsets)
        print(json.dumps({"case": "ivf_build", "lists": FLAGS.lists, "seconds": round(build, 1),
                          "mean_list": float(sizes.mean()), "max_list": int(sizes.max())}),
              flush=True)
    for dtype in FLAGS.dtype:
        stored = jnp.asarray(corpus.astype(jnp.dtype(dtype)))
        seconds, (_, exact_rows) = timed(lambda q, e: search.exact_topk(q, e, FLAGS.k),
                                         queries, stored, repeats=FLAGS.repeats)
        exact_rows = np.asarray(exact_rows)
        print(json.dumps({"case": "exact", "dtype": dtype, "seconds": round(seconds, 4),
                          "recall": 1.0}), flush=True)
        if layout is None:
            continue
        centroids, offsets = jnp.asarray(layout.centroids), jnp.asarray(layout.offsets)
        for nprobe in map(int, FLAGS.nprobe):
            seconds, (_, rows) = timed(
                lambda q, e: ivf.ivf_topk(q, e, centroids, offsets, FLAGS.k, nprobe,
                                          FLAGS.block), queries, stored,
                repeats=FLAGS.repeats)
            print(json.dumps({"case": "ivf", "dtype": dtype, "nprobe": nprobe,
                              "seconds": round(seconds, 4),
                              "recall": round(ivf.recall(np.asarray(rows), exact_rows), 4)}),
                  flush=True)
        del stored


if __name__ == "__main__":
    app.run(main, argv=sys.argv)

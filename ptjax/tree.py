"""Parameter-pytree utilities: `/`-joined paths, regex selection, split/merge by mask, sizes.

One selector drives everything that picks parameters by name (LoRA targets, quantization targets,
frozen parameters, weight-decay exclusions, sharding fallbacks), so configs only ever speak in
regexes over paths like ``layers_3/attn/q/kernel``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_weight_node(x) -> bool:
    """True for the registered weight-node dataclasses that stand where an array stood."""
    return getattr(type(x), "is_weight_node", False)


def path_str(path) -> str:
    """Turn a jax key path into the `/`-joined name configs match regexes against."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k).strip(".[]'\""))
    return "/".join(parts)


def flatten_with_paths(tree: PyTree, *, nodes_as_leaves: bool = False) -> list[tuple[str, Any]]:
    """List `(path, leaf)` pairs; with `nodes_as_leaves`, weight nodes are not looked into."""
    is_leaf = is_weight_node if nodes_as_leaves else None
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), v) for p, v in flat]


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *, nodes_as_leaves: bool = False) -> PyTree:
    """`jax.tree.map` whose function also receives the leaf's `/`-joined path."""
    is_leaf = is_weight_node if nodes_as_leaves else None
    return jax.tree_util.tree_map_with_path(lambda p, v: fn(path_str(p), v), tree, is_leaf=is_leaf)


def select(tree: PyTree, pattern: str | None) -> PyTree:
    """Boolean mask pytree: True where the leaf's path matches `pattern` (``re.search``).

    `None` or "" selects nothing. Leaves inside weight nodes are matched by their full path
    (``layers_0/attn/q/kernel/a`` for a LoRA factor), so a pattern can target node parts.
    """
    if not pattern:
        return jax.tree.map(lambda _: False, tree)
    regex = re.compile(pattern)
    return map_with_path(lambda p, _: bool(regex.search(p)), tree)


def trainable_mask(tree: PyTree, pattern: str | None) -> PyTree:
    """`select(tree, pattern)` restricted to floating-point leaves: integer codes and boolean
    masks inside weight nodes (quantized or pruned weights) can never take a gradient step, so
    a pattern like `.*` (full fine-tuning) leaves them frozen."""
    return jax.tree.map(lambda m, x: bool(m) and jax.numpy.issubdtype(x.dtype, jax.numpy.floating),
                        select(tree, pattern), tree)


def split(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Split into (selected, rest): two trees of the same structure with `None` holes.

    `jax.grad` over the first part only gives gradients (and optimizer state) for exactly the
    selected leaves; `merge` puts the halves back together.
    """
    selected = jax.tree.map(lambda v, m: v if m else None, tree, mask)
    rest = jax.tree.map(lambda v, m: None if m else v, tree, mask)
    return selected, rest


def merge(a: PyTree, b: PyTree) -> PyTree:
    """Inverse of `split`: take each leaf from whichever half holds it."""
    return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def count(tree: PyTree) -> int:
    """Number of scalars in all array leaves (None holes count zero)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def nbytes(tree: PyTree) -> int:
    """Bytes held by all array leaves, for optimizer-state and checkpoint accounting."""
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def to_host(tree: PyTree) -> PyTree:
    """Every array leaf of `tree` as a host numpy array, gathered from all processes where it
    spans several.

    Why: `jax.device_get` reads only the shards this process holds, so exporting an FSDP- or
    tensor-sharded model from process 0 of a multi-host run needs the other hosts' shards
    first. A collective in a multi-process run: every process calls it, on the same tree.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


# Float matrices that only ever feed a matmul: kernels, and the base a node wraps. Lookup tables
# (read by `ops.embed` in float32) and quantized nodes' codes and scales are not among them.
MATMUL_WEIGHTS = r"/kernel(/base)*$"


def cast_matmul_weights(tree: PyTree, dtype) -> PyTree:
    """`tree` with its `MATMUL_WEIGHTS` float matrices stored in `dtype` (the compute dtype).

    Why: every matmul casts its weight to the compute dtype anyway, so the results are the same,
    but a copy kept in it costs half the memory and no cast per use: a frozen base in a train
    step, every weight in every step of a decode loop. Vectors (norm scales, biases), lookup
    tables and quantized codes and scales keep their dtypes.
    """
    return jax.tree.map(
        lambda x, matmul: x.astype(dtype)
        if matmul and x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree, select(tree, MATMUL_WEIGHTS))

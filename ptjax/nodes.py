"""Weight nodes: small registered pytree dataclasses that stand where a weight array stood.

`ops.linear(x, w)` calls `w.linear(x, dtype, rng)` for a node, so LoRA, DoRA, IA3, adapters and
quantized weights reach the model without it changing. Nodes nest (`LoRA(base=NF4(...))`): a
node's `linear` calls `ops.linear` on what it wraps.

Every node wraps one 2-D weight laid out [in, out] (or [vocab, dim] for embeddings) and says:
- `linear(x, dtype, rng)`: its matmul (`rng` is a key in training steps, None otherwise);
- `materialize()`: the plain array it stands for (merging, export, kernels needing it whole);
- `part_axes(axes)`: the logical axes of each of its fields given the wrapped weight's axes, so
  sharding rules apply to nodes without knowing them.
Fields holding arrays are pytree children (trainable or frozen by path, e.g. `.../kernel/a`);
hyperparameters are static.
"""

from __future__ import annotations

import dataclasses

import jax


class WeightNode:
    """Mixin marking a pytree dataclass as a weight node (see module docstring)."""

    is_weight_node = True

    @property
    def shape(self):
        """Shape of the weight this node stands for (that of what it wraps)."""
        return self.base.shape

    def linear(self, x, dtype, rng=None):
        raise NotImplementedError(f"{type(self).__name__} cannot be used as a linear weight")

    def embed(self, ids, dtype):
        """Rows of the materialized table (nodes wrapping embeddings may do better)."""
        import jax.numpy as jnp

        return jnp.take(self.materialize(), ids, axis=0).astype(dtype)

    def materialize(self):
        raise NotImplementedError

    def part_axes(self, axes: tuple) -> dict:
        raise NotImplementedError

    def map_parts(self, fn):
        """A copy with `fn(name, value)` applied to each pytree field that is not None."""
        changes = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("pytree_node", True):
                value = getattr(self, f.name)
                changes[f.name] = None if value is None else fn(f.name, value)
        return self.replace(**changes)


def nodes_of(params, node_type=WeightNode) -> list:
    """All nodes of a type in a tree, outermost first (for tests and accounting)."""
    found = []

    def visit(x):
        if isinstance(x, node_type):
            found.append(x)
        return x

    jax.tree.map(visit, params, is_leaf=lambda x: isinstance(x, node_type))
    return found


def merge(params, node_types=WeightNode):
    """Every node of `node_types` replaced by the plain array it stands for (`materialize`).

    Why generic: merging LoRA, DoRA or IA3 into the weights, or dequantizing for export, is the
    same walk; outermost nodes are materialized whole (a LoRA over an NF4 base becomes one
    array), so nested nodes need no order of their own.
    """
    return jax.tree.map(lambda x: x.materialize() if isinstance(x, node_types) else x, params,
                        is_leaf=lambda x: isinstance(x, node_types))

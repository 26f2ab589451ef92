"""IA3 (2205.05638): learned vectors that rescale keys, values and the FFN's inner activations.

Attention projections get an output-side vector (`k = (x W_k) * l_k`); the FFN down-projection
gets an input-side one (`down(l_ff * h)`, i.e. `(l_ff * act(W1 x)) W2`). Vectors start at one,
so injection leaves the model unchanged; merging scales W's columns or rows.
"""

from __future__ import annotations

import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax import tree as ptree
from ptjax.nodes import WeightNode

F32 = jnp.float32

DEFAULT_TARGETS = r"layers_\d+/(attn/(k|v)|mlp/down)/kernel$"
DEFAULT_FEEDFORWARD = r"mlp/down/kernel$"
TRAINABLE = r"/ia3$"


@flax.struct.dataclass
class IA3(WeightNode):
    """`base` with a learned per-feature scale on its output (`side="output"`) or input side."""

    base: Any
    ia3: Any  # [out] for the output side, [in] for the input side
    side: str = flax.struct.field(pytree_node=False, default="output")

    def linear(self, x, dtype, rng=None):
        if self.side == "input":
            return ops.linear((x.astype(F32) * self.ia3).astype(x.dtype), self.base, dtype, rng)
        y = ops.linear(x, self.base, dtype, rng)
        return (y.astype(F32) * self.ia3).astype(y.dtype)

    def materialize(self):
        w = ops.materialize(self.base)
        scale = self.ia3[:, None] if self.side == "input" else self.ia3[None, :]
        return (w.astype(F32) * scale).astype(w.dtype)

    def part_axes(self, axes):
        return {"base": axes, "ia3": (axes[0],) if self.side == "input" else (axes[1],)}


def inject(params, *, targets: str = DEFAULT_TARGETS, feedforward: str = DEFAULT_FEEDFORWARD):
    """Wrap matching weights in IA3 nodes (input side where `feedforward` matches), vectors = 1."""
    regex, ff = re.compile(targets), re.compile(feedforward)

    def wrap(path, w):
        if not regex.search(path):
            return w
        fan_in, fan_out = w.shape
        side = "input" if ff.search(path) else "output"
        return IA3(base=w, ia3=jnp.ones((fan_in if side == "input" else fan_out,), F32), side=side)

    out = ptree.map_with_path(wrap, params, nodes_as_leaves=True)
    if not any(isinstance(n, IA3) for n in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, IA3))):
        raise ValueError(f"peft.targets: {targets!r} matches no parameter")
    return out

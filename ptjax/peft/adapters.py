"""Bottleneck adapters (Houlsby et al. 1902.00751; Pfeiffer's FFN-only placement).

An adapter sits after a projection, before the residual add: `h = linear(x, W);
h + up(act(down(h)))`. Houlsby places one after the attention output projection and one after the
FFN down-projection; Pfeiffer only after the FFN. `up` starts at zero, so injection is an exact
identity; `down` starts with small random weights so gradients flow from the first step.
Adapters are nonlinear and cannot be merged into the base weight.
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

PLACEMENTS = {
    "houlsby": r"layers_\d+/(attn/o|mlp/down)/kernel$",
    "pfeiffer": r"layers_\d+/mlp/down/kernel$",
}
TRAINABLE = r"/(down|up|down_bias|up_bias)$"
ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu}


@flax.struct.dataclass
class Adapter(WeightNode):
    """A projection followed by a residual bottleneck MLP on its output."""

    base: Any
    down: Any  # [out, bottleneck]
    down_bias: Any
    up: Any  # [bottleneck, out]
    up_bias: Any
    activation: str = flax.struct.field(pytree_node=False, default="gelu")

    def linear(self, x, dtype, rng=None):
        h = ops.linear(x, self.base, dtype, rng)
        z = ops.dense(h, self.down, dtype).astype(F32) + self.down_bias
        z = ACTIVATIONS[self.activation](z).astype(dtype)
        out = h.astype(F32) + ops.dense(z, self.up, dtype).astype(F32) + self.up_bias
        return out.astype(h.dtype)

    def materialize(self):
        raise ValueError("bottleneck adapters are nonlinear and cannot be merged into a weight")

    def part_axes(self, axes):
        return {"base": axes, "down": (axes[1], None), "down_bias": (None,),
                "up": (None, axes[1]), "up_bias": (axes[1],)}


def inject(params, key, *, placement: str = "houlsby", bottleneck: int = 64,
           activation: str = "gelu", init_std: float = 1e-3):
    """Insert adapters after the projections `placement` names (houlsby or pfeiffer)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"peft.placement: unknown {placement!r}; choose {sorted(PLACEMENTS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"peft.activation: unknown {activation!r}; choose {sorted(ACTIVATIONS)}")
    regex = re.compile(PLACEMENTS[placement])
    paths = [p for p, _ in ptree.flatten_with_paths(params, nodes_as_leaves=True) if regex.search(p)]
    keys = dict(zip(paths, jax.random.split(key, max(len(paths), 1))))

    def wrap(path, w):
        if path not in keys:
            return w
        out = w.shape[1]
        return Adapter(base=w,
                       down=init_std * jax.random.normal(keys[path], (out, bottleneck), F32),
                       down_bias=jnp.zeros((bottleneck,), F32),
                       up=jnp.zeros((bottleneck, out), F32),
                       up_bias=jnp.zeros((out,), F32), activation=activation)

    return ptree.map_with_path(wrap, params, nodes_as_leaves=True)

"""Calibration-based pruning without retraining: Wanda (2306.11695), layer by layer.

Wanda scores each weight by |W_ij| * ||X_i||_2, the weight's magnitude times the norm of its
input feature over calibration tokens, and prunes the lowest scores within each output (each row
of PyTorch's [out, in] weight). As in the paper's code, layers are pruned in order and each
layer's inputs come from the already-pruned layers before it, so later layers adapt their
choice to the errors upstream.

The activations are recorded by `Recorder` nodes placed on one layer's kernels for one forward
pass of that layer (`llama.decoder_layer`), so the model needs no hooks.
"""

from __future__ import annotations

import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ptjax import ops
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.nodes import WeightNode

F32 = jnp.float32


@flax.struct.dataclass
class Recorder(WeightNode):
    """A kernel that also returns (through `sums`) the per-input-feature sum of squares of what
    it was multiplied with; used on one layer at a time, outside training."""

    base: Any
    sums: dict = flax.struct.field(pytree_node=False, default=None)
    name: str = flax.struct.field(pytree_node=False, default="")

    def linear(self, x, dtype, rng=None):
        xf = x.astype(F32).reshape(-1, x.shape[-1])
        jax.debug.callback(self._add, jnp.sum(xf * xf, axis=0), xf.shape[0])
        return ops.linear(x, self.base, dtype, rng)

    def _add(self, squares, count):
        total, n = self.sums.get(self.name, (0.0, 0))
        self.sums[self.name] = (total + np.asarray(squares, np.float64), n + int(count))

    def materialize(self):
        return ops.materialize(self.base)

    def part_axes(self, axes):
        return {"base": axes}


def input_norms(layer_params, cfg, x, positions, mask, targets: re.Pattern, prefix: str):
    """(||X_i||_2 per input feature of every targeted kernel in one layer, keyed by full path;
    the layer's output). `x` [b, s, hidden] are the layer's inputs."""
    sums: dict = {}

    def wrap(path, w):
        full = f"{prefix}/{path}"
        if targets.search(full) and len(np.shape(w)) == 2:
            return Recorder(base=w, sums=sums, name=full)
        return w

    recording = ptree.map_with_path(wrap, layer_params, nodes_as_leaves=True)
    out, _ = llama.decoder_layer(recording, cfg, x, positions, mask)
    jax.effects_barrier()
    return {name: np.sqrt(total) for name, (total, _) in sums.items()}, out


def wanda_scores(w, norms) -> np.ndarray:
    """|W| * ||X_i|| for an [in, out] kernel and per-input norms [in]."""
    return np.abs(np.asarray(w, np.float64)) * np.asarray(norms, np.float64)[:, None]

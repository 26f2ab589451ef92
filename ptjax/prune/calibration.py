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
    """A kernel that also hands the host (into `sums`) the Gram matrix X^T X of what it was
    multiplied with (its diagonal is Wanda's squared norms, the whole is SparseGPT's Hessian);
    used on one layer at a time, outside training."""

    base: Any
    sums: dict = flax.struct.field(pytree_node=False, default=None)
    name: str = flax.struct.field(pytree_node=False, default="")

    def linear(self, x, dtype, rng=None):
        xf = x.astype(F32).reshape(-1, x.shape[-1])
        gram = jax.lax.dot_general(xf, xf, (((0,), (0,)), ((), ())),
                                   precision=jax.lax.Precision.HIGHEST)
        jax.debug.callback(self._add, gram, xf.shape[0])
        return ops.linear(x, self.base, dtype, rng)

    def _add(self, gram, count):
        total, n = self.sums.get(self.name, (0.0, 0))
        self.sums[self.name] = (total + np.asarray(gram, np.float64), n + int(count))

    def materialize(self):
        return ops.materialize(self.base)

    def part_axes(self, axes):
        return {"base": axes}


def input_grams(layer_params, cfg, x, rotary, mask, targets: re.Pattern, prefix: str):
    """{full path: (X^T X float64 [in, in], token count)} of every targeted kernel in one layer,
    from one forward pass of the layer on its inputs `x` [b, s, hidden] (`rotary`: the tokens'
    `llama.rotary_tables`)."""
    sums: dict = {}

    def wrap(path, w):
        full = f"{prefix}/{path}"
        if targets.search(full) and len(np.shape(w)) == 2:
            return Recorder(base=w, sums=sums, name=full)
        return w

    recording = ptree.map_with_path(wrap, layer_params, nodes_as_leaves=True)
    llama.decoder_layer(recording, cfg, x, rotary, mask)
    jax.effects_barrier()
    return dict(sums)


def wanda_scores(w, norms) -> np.ndarray:
    """|W| * ||X_i|| for an [in, out] kernel and per-input norms [in]."""
    return np.abs(np.asarray(w, np.float64)) * np.asarray(norms, np.float64)[:, None]


def sparsegpt(kernel, gram, count: int, sparsity: float, structure=None, block: int = 128,
              damp: float = 0.01):
    """SparseGPT (2301.00774) on one [in, out] kernel: prune and update the kept weights to
    minimize ||X W - X W'||^2 given H = 2 X^T X / count, column by column of PyTorch's [out, in]
    with the Cholesky factor of H^-1 (optimal brain surgeon), lazily in blocks of `block` inputs.

    Unstructured masks are chosen per block from w^2 / [H^-1]_ii^2 over the whole block, as the
    reference code does; `structure=(n, m)` keeps n of every m inputs per output. Returns the new
    [in, out] kernel (float32, pruned entries exactly zero) and its keep-mask.
    """
    w = np.asarray(kernel, np.float64).T.copy()  # [out, in]
    n_in = w.shape[1]
    h = 2.0 * np.asarray(gram, np.float64) / max(count, 1)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(n_in)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    keep = np.ones_like(w, bool)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1, h1 = w[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
        errors = np.zeros_like(w1)
        pruned = np.zeros_like(w1, bool)
        if structure is None:
            score = w1**2 / np.diag(h1)[None, :] ** 2
            cut = int(score.size * sparsity)
            if cut:
                pruned = score <= np.sort(score.reshape(-1))[cut - 1]
        for i in range(i2 - i1):
            if structure is not None and i % structure[1] == 0:
                score = w1[:, i:i + structure[1]] ** 2 / np.diag(h1)[i:i + structure[1]] ** 2
                low = np.argsort(score, axis=1, kind="stable")[:, :structure[1] - structure[0]]
                np.put_along_axis(pruned[:, i:i + structure[1]], low, True, axis=1)
            q = np.where(pruned[:, i], 0.0, w1[:, i])
            err = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= np.outer(err, h1[i, i:])
            w1[:, i] = q
            errors[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~pruned
    keep &= ~dead[None, :]
    w = np.where(keep, w, 0.0)
    return w.T.astype(np.float32), keep.T

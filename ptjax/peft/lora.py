"""LoRA and DoRA as weight nodes, plus injection, merging and unmerging as `params -> params`.

LoRA (2106.09685): `y = x W + scale * (dropout(x) A) B` with A [in, r], B [r, out],
`scale = alpha / r` (rsLoRA: `alpha / sqrt(r)`). W + BA is never materialized in the forward
pass, so training memory stays that of the base. DoRA (2402.09353) rescales each output column of
`W + scale * A B` to a learned magnitude `m`, dividing by the column norm with no gradient
through the norm.

Kernels here are [in, out]; the PEFT files store A as [r, in] and B as [out, r] (see
`ptjax/interop/peft_format.py`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax import tree as ptree
from ptjax.nodes import WeightNode

F32 = jnp.float32

DEFAULT_TARGETS = r"layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"


def _dropout(x, rate, key):
    """Inverted dropout of the low-rank branch's input (PEFT's `lora_dropout`): keep each entry
    with probability 1 - rate and scale kept ones by 1/(1 - rate); identity without a key."""
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _low_rank(x, a, b, scale, dtype):
    return ops.dense(ops.dense(x, a, dtype), b, dtype).astype(F32) * scale


@flax.struct.dataclass
class LoRA(WeightNode):
    """`base` (array or node, [in, out]) plus a scaled low-rank update `A @ B`."""

    base: Any
    a: Any
    b: Any
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self):
        return (self.a.shape[0], self.b.shape[1])

    def linear(self, x, dtype, rng=None):
        """`x W + scale * (dropout(x) A) B`; dropout masks come from `rng` (training only)."""
        y = ops.linear(x, self.base, dtype, ops.fold_key(rng, 1))
        delta = _low_rank(_dropout(x, self.dropout, rng), self.a, self.b, self.scale, dtype)
        return (y.astype(F32) + delta).astype(y.dtype)

    def delta(self):
        """The dense update `scale * A @ B` [in, out] (float32)."""
        return self.scale * jnp.dot(self.a.astype(F32), self.b.astype(F32))

    def materialize(self):
        base = ops.materialize(self.base)
        return (base.astype(F32) + self.delta()).astype(base.dtype)

    def part_axes(self, axes):
        return {"base": axes, "a": (axes[0], None), "b": (None, axes[1])}


@flax.struct.dataclass
class DoRA(WeightNode):
    """Weight-decomposed LoRA: `m * (W + s A B) / ||W + s A B||` column-wise, norm detached."""

    base: Any
    a: Any
    b: Any
    magnitude: Any  # [out]
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self):
        return (self.a.shape[0], self.b.shape[1])

    def column_norm(self):
        """||W + s A B|| per output column, as a constant for the gradient (DoRA section 4.3)."""
        w = ops.materialize(self.base).astype(F32) + self.scale * jnp.dot(
            self.a.astype(F32), self.b.astype(F32))
        return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=0)))

    def linear(self, x, dtype, rng=None):
        y = ops.linear(x, self.base, dtype, ops.fold_key(rng, 1)).astype(F32)
        y = y + _low_rank(_dropout(x, self.dropout, rng), self.a, self.b, self.scale, dtype)
        return (y * (self.magnitude.astype(F32) / self.column_norm())).astype(dtype)

    def materialize(self):
        base = ops.materialize(self.base)
        w = base.astype(F32) + self.scale * jnp.dot(self.a.astype(F32), self.b.astype(F32))
        norm = jnp.sqrt(jnp.sum(w * w, axis=0))
        return (w * (self.magnitude.astype(F32) / norm)).astype(base.dtype)

    def part_axes(self, axes):
        return {"base": axes, "a": (axes[0], None), "b": (None, axes[1]),
                "magnitude": (axes[1],)}


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def init_a(key, fan_in: int, rank: int, init: str):
    """A [in, r]: Kaiming-uniform as PEFT does (bound 1/sqrt(in)), or Gaussian N(0, (1/r)^2)."""
    if init == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, (fan_in, rank), F32, -bound, bound)
    if init == "gaussian":
        return jax.random.normal(key, (fan_in, rank), F32) / rank
    raise ValueError(f"peft.init: unknown LoRA init {init!r}; choose 'kaiming' or 'gaussian'")


def inject(params, key, *, targets: str = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
           dropout: float = 0.0, init: str = "kaiming", rslora: bool = False,
           dora: bool = False):
    """Wrap every weight whose path matches `targets` in a LoRA (or DoRA) node.

    B starts at zero, so the model's function is unchanged until training moves it. Works on
    plain arrays and on other nodes (QLoRA is `inject(nf4(params))`).
    """
    regex = re.compile(targets)
    scale = lora_scale(alpha, rank, rslora)
    matched = [p for p, _ in ptree.flatten_with_paths(params, nodes_as_leaves=True) if regex.search(p)]
    if not matched:
        raise ValueError(f"peft.targets: {targets!r} matches no parameter")
    keys = dict(zip(matched, jax.random.split(key, len(matched))))

    def wrap(path, w):
        if path not in keys:
            return w
        fan_in, fan_out = w.shape
        a = init_a(keys[path], fan_in, rank, init)
        b = jnp.zeros((rank, fan_out), F32)
        if dora:
            norm = jnp.sqrt(jnp.sum(ops.materialize(w).astype(F32) ** 2, axis=0))
            return DoRA(base=w, a=a, b=b, magnitude=norm, scale=scale, dropout=dropout)
        return LoRA(base=w, a=a, b=b, scale=scale, dropout=dropout)

    return ptree.map_with_path(wrap, params, nodes_as_leaves=True)


TRAINABLE = r"/(a|b|magnitude)$"  # the parts of LoRA/DoRA nodes that train


def unmerge(merged, adapters):
    """Take LoRA updates back out of merged weights: `W = W_merged - s A B` at each node of
    `adapters` (a tree holding the LoRA nodes, e.g. the trained params). DoRA is not invertible
    without the base norm, so it is refused."""

    def take_out(node, w):
        if isinstance(node, DoRA):
            raise ValueError("unmerge: DoRA merges are not invertible; keep the unmerged params")
        if isinstance(node, LoRA):
            return node.replace(base=(w.astype(F32) - node.delta()).astype(w.dtype))
        return w

    return jax.tree.map(take_out, adapters, merged, is_leaf=lambda x: isinstance(x, (LoRA, DoRA)))

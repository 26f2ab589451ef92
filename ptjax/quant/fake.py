"""Fake quantization for quantization-aware training (QAT), and its conversion to real storage.

A `FakeQuant` node wraps a trainable float kernel. Its forward pass uses the weight rounded to
the target format (int8, int4 or fp8 e4m3, scales per channel, group or tensor; see
`ptjax.quant.intq`), and optionally rounds the layer's input activations too (per-token dynamic
scales), so training sees the error deployment will have. Gradients go straight through the
rounding (the straight-through estimator): identity for values inside the clipping range, zero
for values clipped away. `convert` turns every node into a `Quantized` node whose outputs equal
the fake-quantized forward's, because both call the same rounding function.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax.nodes import WeightNode
from ptjax.quant import intq


def _inside(w, scale, zero, fmt, granularity, group_size, symmetric):
    """True where a value lies within the representable (clipping) range of its scale."""
    x = intq.scaled(w, scale, zero, granularity, group_size)
    lo, hi = intq.limits(fmt, symmetric)
    if fmt != "fp8":  # rounding to the end codes still counts as inside
        lo, hi = lo - 0.5, hi + 0.5
    return ((x >= lo) & (x <= hi)).reshape(w.shape)


def fake_quantize(w, fmt: str, granularity: str = "channel", group_size: int = 128,
                  symmetric: bool = True, clip: float = 1.0):
    """w [in, out] rounded to the format and back, with the straight-through gradient."""
    scale, zero = intq.scales(w, fmt, granularity, group_size, symmetric, clip)
    q = intq.quantize_values(w, scale, zero, fmt, granularity, group_size, symmetric)
    wq = intq.dequantize_values(q, scale, zero).reshape(w.shape).astype(w.dtype)
    inside = _inside(w, scale, zero, fmt, granularity, group_size, symmetric)
    # Forward: wq. Backward: 1 inside the range, 0 outside.
    passthrough = w + jax.lax.stop_gradient(wq - w)
    return jnp.where(inside, passthrough, jax.lax.stop_gradient(wq))


@flax.struct.dataclass
class FakeQuant(WeightNode):
    """A trainable [in, out] kernel seen through a quantizer (QAT); `act_fmt` ("" for none)
    also rounds the layer's inputs."""

    base: jnp.ndarray
    fmt: str = flax.struct.field(pytree_node=False, default="int8")
    granularity: str = flax.struct.field(pytree_node=False, default="channel")
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    symmetric: bool = flax.struct.field(pytree_node=False, default=True)
    clip: float = flax.struct.field(pytree_node=False, default=1.0)
    act_fmt: str = flax.struct.field(pytree_node=False, default="")

    def quantized_weight(self):
        return fake_quantize(self.base, self.fmt, self.granularity, self.group_size,
                             self.symmetric, self.clip)

    def linear(self, x, dtype, rng=None):
        if self.act_fmt:
            x = intq.quantize_activations(x, self.act_fmt)
        return ops.dense(x, self.quantized_weight(), dtype)

    def materialize(self):
        return self.quantized_weight()

    def part_axes(self, axes):
        return {"base": axes}


def convert(node: FakeQuant) -> intq.Quantized:
    """The real-storage node a QAT weight deploys as (same codes, same scales)."""
    return intq.quantize(node.base, node.fmt, node.granularity, node.group_size, node.symmetric,
                         node.clip, act_fmt=node.act_fmt)

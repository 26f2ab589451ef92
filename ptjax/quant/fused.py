"""Quantized kernels multiplied straight from their codes in the CPU decode loop.

Why: a decode step multiplies a few rows by every weight, so it is bound by the bytes it reads;
XLA's path (`ops.frozen_linear`) writes each quantized layer's weight out in bf16 first, which
made NF4 and int8 models decode slower than bf16 ones. `FusedDecode` stands where an NF4/FP4 node
or a per-channel symmetric int8 node stood and calls `ptjax.kernels.cpu` instead (bf16 compute;
other dtypes keep the node's own path). The sampler applies it through `sampling.decode_layout`
for the loop only: prefill and training keep XLA's dot, which is faster with many rows.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax.kernels import cpu
from ptjax.nodes import WeightNode
from ptjax.quant import intq, nf4

CHUNK = 32  # weights the kernel decodes per vector


def fusable(node) -> bool:
    """Whether the fused kernel computes this node's matmul exactly as its own path does."""
    if isinstance(node, nf4.NF4):
        n_in, _ = node.kernel_shape
        return node.blocksize % CHUNK == 0 and n_in % node.blocksize == 0
    if isinstance(node, intq.Quantized):
        return (node.fmt == "int8" and node.granularity == "channel" and node.symmetric
                and node.zero is None and not node.act_fmt and node.kernel_shape[0] % CHUNK == 0)
    return False


@flax.struct.dataclass
class FusedDecode(WeightNode):
    """An NF4/FP4 or int8 node whose bf16 matmul runs in the fused CPU kernel.

    The kernel reads weight rows ([out, in], along the input): NF4 codes already run that way
    (bitsandbytes' layout), int8 codes are stored [in, out], so `codes_t` holds them transposed,
    made once per `generate` call (a copy of the int8 codes while the loop runs, as
    `decode_layout` copies bf16 kernels)."""

    base: Any
    codes_t: Any = None  # int8 only: the codes [out, in]

    def linear(self, x, dtype, rng=None):
        if jnp.dtype(dtype) != jnp.bfloat16:
            return self.base.linear(x, dtype, rng)
        x2 = x.reshape(-1, x.shape[-1])
        node = self.base
        if isinstance(node, nf4.NF4):
            y = cpu.nf4_matmul(x2, node.codes, node.block_absmax(),
                               jnp.asarray(nf4.LEVELS[node.quant_type]))
        else:
            y = cpu.int8_matmul(x2, self.codes_t, node.scale.reshape(-1))
        return y.astype(dtype).reshape(*x.shape[:-1], y.shape[-1])

    def materialize(self):
        return self.base.materialize()

    def part_axes(self, axes):
        return {"base": axes, "codes_t": tuple(axes)[::-1]}


def for_decode(params):
    """`params` with every fusable quantized node wrapped in `FusedDecode`, where the fused
    kernels run (x86 CPU with AVX-512 BF16 and a C++ compiler); unchanged elsewhere."""
    nodes = jax.tree.leaves(params, is_leaf=fusable)
    if not any(fusable(n) for n in nodes) or not cpu.available():
        return params

    def wrap(node):
        if not fusable(node):
            return node
        if isinstance(node, nf4.NF4):
            return FusedDecode(node)
        return FusedDecode(node, ops.real_transpose(node.codes.reshape(node.kernel_shape)))

    return jax.tree.map(wrap, params, is_leaf=fusable)

"""Integer (int8, int4) and fp8 (e4m3) weight quantization: the formats, and real storage.

One function, `quantize_values`, defines every format's rounding: weight-only post-training
quantization (`Quantized` nodes, stored in int8, packed int4 or float8) and fake quantization
for QAT (`ptjax.quant.fake`) both call it, so a QAT model converted to real storage computes the
same outputs as the fake-quantized one.

Scales run per output channel, per group of `group_size` input rows within each output channel,
or per tensor. Symmetric formats map [-amax, amax] onto [-qmax, qmax]; asymmetric ones map
[min, max] onto [0, 2^bits - 1] with an integer zero point. `clip` < 1 narrows the range to that
fraction of the absmax (values outside saturate), the usual trade of outliers for resolution.
"""

from __future__ import annotations


import flax.struct
import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax.nodes import WeightNode

F32 = jnp.float32
FORMATS = ("int8", "int4", "fp8")
GRANULARITIES = ("channel", "group", "tensor")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def bits(fmt: str) -> int:
    return {"int8": 8, "int4": 4, "fp8": 8}[fmt]


def check_format(fmt: str, granularity: str, symmetric: bool):
    """Refuse unknown formats and combinations, naming the config key."""
    if fmt not in FORMATS:
        raise ValueError(f"quant.method: unknown format {fmt!r}; choose one of {FORMATS} "
                         "(or nf4, fp4)")
    if granularity not in GRANULARITIES:
        raise ValueError(f"quant.granularity: unknown {granularity!r}; choose one of "
                         f"{GRANULARITIES}")
    if fmt == "fp8" and not symmetric:
        raise ValueError("quant.symmetric: fp8 (e4m3) has a sign bit; it is symmetric only")


def _grouped(w, granularity: str, group_size: int):
    """w [in, out] viewed as [groups, rows per group, out] (groups along the input dim)."""
    n_in, n_out = w.shape
    if granularity == "group":
        if n_in % group_size:
            raise ValueError(f"quant.group_size: {group_size} does not divide the input "
                             f"dimension {n_in} of a [{n_in}, {n_out}] weight")
        return w.reshape(n_in // group_size, group_size, n_out)
    return w.reshape(1, n_in, n_out)


def _reduce(x, granularity: str, fn):
    """Statistic over each scale's values: rows of a group (and all columns for `tensor`)."""
    axes = (1, 2) if granularity == "tensor" else (1,)
    return fn(x, axis=axes, keepdims=True)


def scales(w, fmt: str, granularity: str = "channel", group_size: int = 128,
           symmetric: bool = True, clip: float = 1.0):
    """(scale, zero) of a float [in, out] weight, each [groups, 1, out] (or [1, 1, 1]).

    `zero` is None for symmetric formats. No gradient flows through either (they are the
    quantizer's state, not the weight).
    """
    w = jax.lax.stop_gradient(_grouped(w.astype(F32), granularity, group_size))
    if fmt == "fp8":
        amax = _reduce(jnp.abs(w), granularity, jnp.max) * clip
        return jnp.where(amax > 0, amax / FP8_MAX, 1.0), None
    b = bits(fmt)
    if symmetric:
        qmax = 2 ** (b - 1) - 1
        amax = _reduce(jnp.abs(w), granularity, jnp.max) * clip
        return jnp.where(amax > 0, amax / qmax, 1.0), None
    lo = _reduce(w, granularity, jnp.min) * clip
    hi = _reduce(w, granularity, jnp.max) * clip
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # zero stays exactly representable
    scale = jnp.where(hi > lo, (hi - lo) / (2**b - 1), 1.0)
    return scale, jnp.round(-lo / scale)


def limits(fmt: str, symmetric: bool) -> tuple[float, float]:
    """The integer (or fp8-scaled) range codes are clipped to."""
    if fmt == "fp8":
        return -FP8_MAX, FP8_MAX
    b = bits(fmt)
    if symmetric:
        return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
    return 0, 2**b - 1


def quantize_values(w, scale, zero, fmt: str, granularity: str, group_size: int,
                    symmetric: bool):
    """Codes of w [in, out] as float32 values on the format's grid, grouped [g, rows, out]
    (integers for int formats, e4m3-representable values for fp8)."""
    x = scaled(w, scale, zero, granularity, group_size)
    lo, hi = limits(fmt, symmetric)
    if fmt == "fp8":
        return jnp.clip(x, lo, hi).astype(jnp.float8_e4m3fn).astype(F32)
    return jnp.clip(jnp.round(x), lo, hi)


def scaled(w, scale, zero, granularity: str, group_size: int):
    """w [in, out] on its scales' grid, grouped [g, rows, out], before rounding and clipping."""
    x = _grouped(w.astype(F32), granularity, group_size) / scale
    return x if zero is None else x + zero


def dequantize_values(q, scale, zero):
    """Grouped codes back to float32 (still grouped)."""
    if zero is not None:
        q = q - zero
    return q * scale


def quantize_activations(x, fmt: str):
    """Symmetric per-token quantization of activations x [..., features] and back (dynamic scale
    from each token's absmax), with a straight-through gradient: W8A8-style inference, and the
    same rounding in QAT."""
    xf = x.astype(F32)
    amax = jax.lax.stop_gradient(jnp.max(jnp.abs(xf), axis=-1, keepdims=True))
    top = FP8_MAX if fmt == "fp8" else 2 ** (bits(fmt) - 1) - 1
    scale = jnp.where(amax > 0, amax / top, 1.0)
    if fmt == "fp8":
        q = jnp.clip(xf / scale, -top, top).astype(jnp.float8_e4m3fn).astype(F32)
    else:
        q = jnp.clip(jnp.round(xf / scale), -top, top)
    xq = (q * scale).astype(x.dtype)
    return x + jax.lax.stop_gradient(xq - x)


def _pack_int4(q):
    """Signed or unsigned 4-bit integers [g, rows, out] as bytes: pairs along the rows, the
    first in the low nibble (rows must be even)."""
    u = (q.astype(jnp.int32) & 15).astype(jnp.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_int4(packed, signed: bool):
    lo, hi = packed & 15, packed >> 4
    q = jnp.stack([lo, hi], axis=2).reshape(packed.shape[0], -1, packed.shape[2]).astype(jnp.int32)
    return jnp.where(q > 7, q - 16, q) if signed else q


@flax.struct.dataclass
class Quantized(WeightNode):
    """A frozen [in, out] kernel in int8, packed int4 (two per byte) or float8 e4m3, with float32
    scales per channel, group or tensor; dequantized inside `linear`, one layer at a time."""

    codes: jnp.ndarray
    scale: jnp.ndarray
    zero: jnp.ndarray | None = None
    kernel_shape: tuple = flax.struct.field(pytree_node=False, default=())
    fmt: str = flax.struct.field(pytree_node=False, default="int8")
    granularity: str = flax.struct.field(pytree_node=False, default="channel")
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    symmetric: bool = flax.struct.field(pytree_node=False, default=True)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    act_fmt: str = flax.struct.field(pytree_node=False, default="")

    @property
    def shape(self):
        return self.kernel_shape

    def grouped_codes(self):
        if self.fmt == "int4":
            return _unpack_int4(self.codes, self.symmetric).astype(F32)
        return self.codes.astype(F32)

    def dequantize(self, dtype=F32):
        w = dequantize_values(self.grouped_codes(), self.scale, self.zero)
        return w.reshape(self.kernel_shape).astype(dtype)

    def linear(self, x, dtype, rng=None):
        """`x W` with W dequantized inside the op (see `ops.frozen_linear`), never kept whole."""
        if self.act_fmt:
            x = quantize_activations(x, self.act_fmt)
        return ops.frozen_linear(self, x, dtype)

    def forward_matmul(self, x, dtype):
        """x [m, in] times the weight dequantized in `dtype` (for `ops.frozen_linear`)."""
        return ops.dot_nn(x, self.dequantize(dtype))

    def input_gradient(self, dy, dtype):
        """dy [m, out] times the transposed weight: both contract their last dimension."""
        return ops.dot_nt(dy, self.dequantize(dtype))

    def materialize(self):
        return self.dequantize(F32).astype(self.dtype)

    def part_axes(self, axes):
        return {"codes": (None, None, axes[1]), "scale": (None, None, axes[1]),
                "zero": (None, None, axes[1])}


def quantize(kernel, fmt: str = "int8", granularity: str = "channel", group_size: int = 128,
             symmetric: bool = True, clip: float = 1.0, act_fmt: str = "") -> Quantized:
    """An [in, out] float kernel as a `Quantized` node (real storage); `act_fmt` also rounds
    the layer's inputs at run time (dynamic per-token scales)."""
    check_format(fmt, granularity, symmetric)
    w = jnp.asarray(kernel)
    if w.ndim != 2:
        raise ValueError(f"quantization needs a 2-D kernel, got shape {w.shape}")
    scale, zero = scales(w, fmt, granularity, group_size, symmetric, clip)
    q = quantize_values(w, scale, zero, fmt, granularity, group_size, symmetric)
    return from_codes(q, scale, zero, tuple(w.shape), fmt, granularity, group_size, symmetric,
                      str(w.dtype), act_fmt)


def from_codes(q, scale, zero, kernel_shape, fmt, granularity, group_size, symmetric, dtype,
               act_fmt=""):
    """A `Quantized` node from grouped float codes (as `quantize_values` returns them)."""
    if fmt == "int4":
        if q.shape[1] % 2:
            raise ValueError(f"int4 storage packs pairs of input rows; {q.shape[1]} rows per "
                             "scale is odd")
        codes = _pack_int4(q)
    elif fmt == "fp8":
        codes = q.astype(jnp.float8_e4m3fn)
    else:
        codes = q.astype(jnp.int8 if symmetric else jnp.uint8)
    return Quantized(codes=codes, scale=scale.astype(F32),
                     zero=None if zero is None else zero.astype(F32), kernel_shape=kernel_shape,
                     fmt=fmt, granularity=granularity, group_size=group_size,
                     symmetric=symmetric, dtype=dtype, act_fmt=act_fmt)

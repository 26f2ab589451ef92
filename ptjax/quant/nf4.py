"""4-bit NormalFloat (NF4) and FP4 with double quantization, laid out as bitsandbytes lays it out.

Why bitsandbytes' layout and not a JAX-native one: QLoRA checkpoints, adapters trained on them and
the numbers people compare against all come from bitsandbytes, so a weight here is stored exactly
as `bitsandbytes.functional.quantize_4bit(W, quant_type="nf4", blocksize=64,
compress_statistics=True)` stores PyTorch's [out, in] weight:

- the weight is flattened row-major in PyTorch's [out, in] order (our kernels are [in, out], so
  the transpose is quantized) and cut into blocks of 64; each block keeps its absmax;
- each value is multiplied by 1/absmax and mapped to the nearest of 16 levels; two codes per byte,
  the first element in the high nibble;
- double quantization: `offset = mean(absmax)`, `absmax - offset` is cut into blocks of 256 and
  quantized to 8 bits with bitsandbytes' signed dynamic code map, one float32 absmax per
  256-block; dequantization adds the offset back.

Storage is 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (4.5 without double quantization).
Quantizing runs once on the host (numpy); dequantizing runs inside `linear`, one layer at a time.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax.numpy as jnp
import numpy as np

from ptjax import ops
from ptjax.nodes import WeightNode

F32 = jnp.float32

NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# FP4 (1 sign, 2 exponent, 1 mantissa bits), bitsandbytes' code order, normalized to max 1.
FP4_LEVELS = np.array([0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
                       -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667,
                       -0.25], np.float32)

LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}
BLOCK = 64
ABSMAX_BLOCK = 256


@functools.lru_cache(maxsize=None)
def dynamic_code_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): 256 sorted
    float32 values, a sign, a run of zero exponent bits marking the decade (1e-6 .. 1) and a
    linear fraction in the bits left, so small absmax deviations keep relative precision.

    `torch.linspace` rounds some of its points differently from numpy's (its result depends on
    the CPU's vector width), so up to a few of these values differ from a given bitsandbytes
    install's in the last bit; files saved by bitsandbytes carry their own map, which is used.
    """
    values = []
    for i in range(7):
        boundaries = np.linspace(0.1, 1, 2**i + 1, dtype=np.float32)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        decade = np.float32(10.0 ** (-6 + i))  # a Python scalar times a float32 tensor: float32
        values += (decade * means).tolist()
        values += (-decade * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return np.sort(np.asarray(values, np.float32))


def _nearest(normalized: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level (levels in any order), by thresholds halfway between sorted
    neighbours: what bitsandbytes' decision tree and binary search compute."""
    order = np.argsort(levels, kind="stable")
    ordered = levels[order].astype(np.float64)
    thresholds = ((ordered[:-1] + ordered[1:]) / 2).astype(np.float32)
    return order[np.searchsorted(thresholds, normalized, side="left")].astype(np.uint8)


def blockwise_quantize(values: np.ndarray, levels: np.ndarray, block: int):
    """(codes uint8 [n], absmax float32 [ceil(n/block)]) of a flat float32 array.

    Each value is scaled by the reciprocal of its block's absmax (bitsandbytes multiplies by
    1/absmax; dividing can round the other way) and mapped to its nearest level. The last block
    may be short; its absmax covers only its own values.
    """
    values = np.asarray(values, np.float32).reshape(-1)
    n = values.size
    pad = (-n) % block
    blocks = np.pad(values, (0, pad)).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(absmax > 0, np.float32(1.0) / absmax, np.float32(0.0)).astype(np.float32)
    normalized = np.clip(blocks * inverse[:, None], -1.0, 1.0)
    return _nearest(normalized, levels).reshape(-1)[:n], absmax


@functools.lru_cache(maxsize=None)
def byte_levels(quant_type: str) -> np.ndarray:
    """[256, 2] float32: the (high nibble, low nibble) levels of every byte value."""
    byte = np.arange(256)
    return np.stack([LEVELS[quant_type][byte >> 4], LEVELS[quant_type][byte & 15]], axis=1)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble (an odd count pads with 0)."""
    codes = np.asarray(codes, np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `pack_nibbles` for the first n codes."""
    packed = np.asarray(packed, np.uint8)
    return np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]


@flax.struct.dataclass
class NF4(WeightNode):
    """A frozen [in, out] kernel stored in 4 bits as bitsandbytes stores PyTorch's [out, in].

    `codes` uint8 [ceil(in*out/2)] packed levels; `absmax` the per-64-block scales, uint8 codes
    of bitsandbytes' dynamic map when double-quantized (then `absmax_scale` float32 per
    256-block and `offset` the float32 mean added back), else float32. `dtype` is what
    `materialize` returns (the weight's original dtype).
    """

    codes: jnp.ndarray
    absmax: jnp.ndarray
    absmax_scale: jnp.ndarray | None = None
    offset: jnp.ndarray | None = None
    code_map: jnp.ndarray | None = None  # a loaded file's own 8-bit map (None: ours)
    kernel_shape: tuple = flax.struct.field(pytree_node=False, default=())
    quant_type: str = flax.struct.field(pytree_node=False, default="nf4")
    blocksize: int = flax.struct.field(pytree_node=False, default=BLOCK)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def shape(self):
        return self.kernel_shape

    @property
    def double_quantized(self) -> bool:
        return self.absmax_scale is not None

    def dynamic_map(self):
        """The 8-bit map the absmax codes index (a loaded file's own, else bitsandbytes')."""
        return dynamic_code_map() if self.code_map is None else self.code_map

    def block_absmax(self):
        """Float32 absmax per 64-block (double quantization undone)."""
        if not self.double_quantized:
            return self.absmax.astype(F32)
        code = jnp.asarray(self.dynamic_map())
        n = self.absmax.shape[0]
        scale = jnp.repeat(self.absmax_scale.astype(F32), ABSMAX_BLOCK)[:n]
        return code[self.absmax.astype(jnp.int32)] * scale + self.offset.astype(F32)

    def dequantize_transposed(self, dtype=F32):
        """The weight as PyTorch's [out, in] (the layout the codes run over), in `dtype`."""
        n_in, n_out = self.kernel_shape
        n = n_in * n_out
        # One lookup per byte gives both of its levels (no per-value integer codes in memory).
        values = jnp.asarray(byte_levels(self.quant_type))[self.codes].reshape(-1)
        if n % self.blocksize == 0:  # every real weight: reshapes only, one fused pass
            w = values.reshape(-1, self.blocksize) * self.block_absmax()[:, None]
            return w.reshape(n_out, n_in).astype(dtype)
        blocks = jnp.pad(values, (0, (-values.size) % self.blocksize)).reshape(-1, self.blocksize)
        w = (blocks * self.block_absmax()[:, None]).reshape(-1)[:n]  # a short last block
        return w.reshape(n_out, n_in).astype(dtype)

    def linear(self, x, dtype, rng=None):
        """`x W` with W dequantized here, in the compute dtype: only this layer's weight ever
        exists in full precision (the backward pass dequantizes again rather than keep it)."""
        return ops.frozen_linear(self, x, dtype)

    def halves(self, dtype):
        """(even, odd) input columns of PyTorch's [out, in] weight, each [out, in/2] in `dtype`:
        the high and the low nibble of each byte, when every 64-block lies within one row.

        Why two halves and not the whole weight: interleaving the two levels of each byte back
        into one matrix is a strided shuffle that XLA's CPU backend runs at a fraction of the
        speed of the lookup itself (measured 2.6 ms for the halves against 8.7 ms for the
        interleaved weight on 11.5 M values); the matmul takes the input's even and odd
        columns instead, which are small in decoding and cheap next to the weight in training.
        """
        n_in, n_out = self.kernel_shape
        levels = jnp.asarray(LEVELS[self.quant_type])
        absmax = self.block_absmax().reshape(n_out, n_in // self.blocksize, 1)
        codes = self.codes.reshape(n_out, n_in // self.blocksize, self.blocksize // 2)

        def half(nibble):
            return (levels[nibble] * absmax).reshape(n_out, n_in // 2).astype(dtype)

        return half(codes >> 4), half(codes & 15)

    def splits_by_halves(self) -> bool:
        n_in, _ = self.kernel_shape
        return n_in % self.blocksize == 0 and self.blocksize % 2 == 0

    def forward_matmul(self, x, dtype):
        """x [m, in] times the weight built here from the codes (for `ops.frozen_linear`)."""
        if not self.splits_by_halves():
            return ops.dot_nt(x, self.dequantize_transposed(dtype))
        even, odd = self.halves(dtype)
        return ops.dot_nt(x[:, 0::2], even) + ops.dot_nt(x[:, 1::2], odd)

    def input_gradient(self, dy, dtype):
        """dy [m, out] times the weight: [m, out] x [out, in] (or its two column halves)."""
        if not self.splits_by_halves():
            return ops.dot_nn(dy, self.dequantize_transposed(dtype))
        even, odd = self.halves(dtype)
        dx = jnp.stack([ops.dot_nn(dy, even), ops.dot_nn(dy, odd)], axis=-1)
        return dx.reshape(dy.shape[0], -1)

    def materialize(self):
        return self.dequantize_transposed(F32).T.astype(self.dtype)

    def part_axes(self, axes):
        # Codes and block absmax run over PyTorch's [out, in] flattened, so contiguous pieces
        # of them are whole output channels: they split with the output axis (over `tensor`
        # for q/k/v/gate/up, `fsdp` for o/down), and a reshape to [out, ...] keeps the split.
        # The input axis is the minor one there and cannot split them; the absmax scales (one
        # per 256 blocks) stay whole.
        return {"codes": (axes[1],), "absmax": (axes[1],), "absmax_scale": (None,),
                "offset": (), "code_map": (None,)}


def quantize(kernel, quant_type: str = "nf4", double_quant: bool = True,
             blocksize: int = BLOCK) -> NF4:
    """An [in, out] kernel as an NF4 (or FP4) node, with double-quantized absmax by default."""
    if quant_type not in LEVELS:
        raise ValueError(f"quant.method: unknown 4-bit type {quant_type!r}; choose nf4 or fp4")
    w = np.asarray(kernel, np.float32)
    if w.ndim != 2:
        raise ValueError(f"4-bit quantization needs a 2-D kernel, got shape {w.shape}")
    codes, absmax = blockwise_quantize(w.T.reshape(-1), LEVELS[quant_type], blocksize)
    node = dict(codes=jnp.asarray(pack_nibbles(codes)), kernel_shape=tuple(w.shape),
                quant_type=quant_type, blocksize=blocksize, dtype=str(np.dtype(kernel.dtype)))
    if not double_quant:
        return NF4(absmax=jnp.asarray(absmax), **node)
    q_absmax, absmax_scale, offset = double_quantize(absmax)
    return NF4(absmax=jnp.asarray(q_absmax), absmax_scale=jnp.asarray(absmax_scale),
               offset=jnp.asarray(offset), **node)


def double_quantize(absmax: np.ndarray):
    """(uint8 codes, float32 scale per 256-block, float32 offset) of the per-block absmax:
    the mean is taken out, the rest is quantized blockwise with the dynamic 8-bit map."""
    offset = np.float32(np.mean(absmax, dtype=np.float32))
    codes, scale = blockwise_quantize(absmax - offset, dynamic_code_map(), ABSMAX_BLOCK)
    return codes, scale, offset


def bits_per_parameter(node: NF4) -> float:
    """Stored bits per weight value: codes, absmax codes or floats, their scales and offset."""
    n = math.prod(node.kernel_shape)
    bits = 8 * node.codes.size + 8 * node.absmax.size * node.absmax.dtype.itemsize
    if node.double_quantized:
        bits += 32 * node.absmax_scale.size + 32
    return bits / n

"""GGUF model files (llama.cpp's format) in and out, for the Llama and Qwen2 architectures.

One table, `gguf_layout(cfg)`, pairs every GGUF tensor name with its pytree path, its stored
shape, whether it is a matrix stored [out, in] (transposed to ptjax's [in, out]) and whether
llama.cpp's converter permuted its rows. Loading and saving both walk that table, so the two
directions cannot drift apart.

Reading uses the `gguf` package (llama.cpp's own Python reader, writer and numpy
(de)quantizers). Its reader builds one numpy view per element of every metadata array, which
takes seconds on a 49k-token vocabulary; `_Reader` reads arrays in one pass instead.

Loaded parameters are numpy arrays (float32 unless asked for bfloat16), dequantized one tensor
at a time so peak host memory stays near the size of the result.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Callable, Collection, Iterator, Mapping

import gguf.quants
import jax
import ml_dtypes
import numpy as np
from gguf import (GGML_QUANT_VERSION, GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType,
                  GGUFWriter, LlamaFileType, RopeScalingType)
from gguf.quants import dequantize, quantize

from ptjax import ops
from ptjax.models import llama
from ptjax.models.config import ModelConfig, rope_scaling_spec

Q = GGMLQuantizationType
ARCHITECTURES = ("llama", "qwen2")
READ_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
LOAD_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
SAVE_DTYPES = {"F32": (Q.F32, LlamaFileType.ALL_F32), "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
               "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
ROPE_FREQS = "rope_freqs.weight"
DEFAULT_CONTEXT = 2048  # written when the config does not state a context length
_CHUNK = 1 << 18  # values dequantized per call: large enough to amortize Python, small in memory

# The llama3 RoPE scalings Meta published (Llama 3.1, Llama 3.2); a GGUF stores only the
# resulting per-frequency divisors (`rope_freqs.weight`), which are matched against these.
LLAMA3_SCALINGS = (
    dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
)


# ----------------------------------------------------------------------------- reading


def _decode_array(buf, offset: int, order: str) -> tuple[list, int]:
    """A GGUF array value at `offset` as a Python list, and its size in bytes.

    Strings are walked with `struct` and scalar runs read with one `np.frombuffer`, instead of
    one numpy view per element as `GGUFReader` does."""
    item_type, count = struct.unpack_from(order + "IQ", buf, offset)
    item_type, pos = GGUFValueType(item_type), offset + 12
    if item_type == GGUFValueType.STRING:
        raw, length = memoryview(buf), struct.Struct(order + "Q")
        values = []
        for _ in range(count):
            (size,) = length.unpack_from(raw, pos)
            if pos + 8 + size > len(raw):
                raise ValueError(f"string at byte {pos} runs past the end of the file")
            values.append(str(raw[pos + 8:pos + 8 + size], "utf-8"))
            pos += 8 + size
        return values, pos - offset
    if item_type == GGUFValueType.ARRAY:
        values = []
        for _ in range(count):
            value, size = _decode_array(buf, pos, order)
            values.append(value)
            pos += size
        return values, pos - offset
    scalar = np.dtype(GGUFReader.gguf_scalar_to_np[item_type]).newbyteorder(order)
    if pos + count * scalar.itemsize > len(buf):
        raise ValueError(f"array at byte {offset} runs past the end of the file")
    return np.frombuffer(buf, scalar, count, pos).tolist(), 12 + count * scalar.itemsize


class _Reader(GGUFReader):
    """`GGUFReader` with metadata arrays decoded in one pass (values kept in `arrays`, keyed by
    the byte offset of the value), tensors and scalar fields exactly as the base class reads
    them. Relies on the base class parsing every field through `_get_field_parts`."""

    def __init__(self, path: str):
        self.arrays: dict[int, list] = {}
        super().__init__(path)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        order = ">" if self.endianess == GGUFEndian.BIG else "<"
        self.arrays[orig_offs], size = _decode_array(self.data, orig_offs, order)
        return size, [self.data[orig_offs:orig_offs + size]], [0], [GGUFValueType.ARRAY]


def _open(path: str) -> _Reader:
    """The parsed file; a truncated or corrupt file is a `ValueError` naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return _Reader(path)
    except (ValueError, IndexError, KeyError, struct.error, OverflowError) as e:
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e


def _metadata(reader: _Reader, path: str) -> dict[str, Any]:
    values = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # header counts the reader presents as fields
            continue
        if field.types == [GGUFValueType.ARRAY]:
            values[name] = reader.arrays[field.offset + sum(p.nbytes for p in field.parts[:3])]
            continue
        try:
            values[name] = field.contents()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: metadata field {name!r} is not valid UTF-8: {e}") from e
    return values


def read_metadata(path: str) -> dict[str, Any]:
    """Every key/value field of a GGUF file as plain Python values (str, int, float, bool, list).

    Why: the metadata carries the model's dimensions and its tokenizer (vocabulary, merges,
    chat template); callers need it without paying for the weights.
    """
    return _metadata(_open(path), path)


# ----------------------------------------------------------------------------- config


def _f32(value) -> float:
    """A float32 field as the decimal its writer meant (1e-05, not 9.999999747378752e-06), so
    configs round-trip and match the Hugging Face `config.json` values exactly."""
    return float(str(np.float32(value)))


def _field(metadata: Mapping, key: str, source: str, default=None):
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"{source}: metadata has no {key!r}")
    return value


def _int_field(metadata: Mapping, key: str, source: str, default=None) -> int:
    """An integer field; llama.cpp allows per-layer lists, which ptjax accepts only when uniform."""
    value = _field(metadata, key, source, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise NotImplementedError(
                f"{source}: {key}={value} varies per layer; ptjax needs one value")
        value = value[0]
    return int(value)


def _linear_scaling(metadata: Mapping, arch: str, source: str) -> tuple:
    """RoPE scaling from the metadata: none, or linear with its factor (llama.cpp's default
    type when only a factor is given). YaRN, LongRoPE and others are refused."""
    key = f"{arch}.rope.scaling.type"
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear"))
    kind = metadata.get(key, "linear" if factor else "none")
    if kind == RopeScalingType.NONE.value:
        return ()
    if kind != RopeScalingType.LINEAR.value:
        raise NotImplementedError(f"{source}: {key}={kind!r} is not supported (only none and linear)")
    return rope_scaling_spec("linear", factor=_f32(factor)) if factor else ()


def _llama3_scaling(rope_freqs: np.ndarray, head_dim: int, theta: float, source: str) -> tuple:
    """The llama3 scaling whose per-frequency divisors equal `rope_freqs.weight` (plain RoPE when
    they are all 1); refused when no published parameter set reproduces them."""
    rope_freqs = np.asarray(rope_freqs, np.float64).reshape(-1)
    if rope_freqs.shape != (head_dim // 2,):
        raise ValueError(f"{source}: tensor {ROPE_FREQS!r} has {rope_freqs.size} entries, "
                         f"but head_dim {head_dim} needs {head_dim // 2}")
    if np.allclose(rope_freqs, 1.0, rtol=0, atol=1e-5):
        return ()
    for fields in LLAMA3_SCALINGS:
        spec = rope_scaling_spec("llama3", **fields)
        if np.allclose(rope_freqs, llama3_rope_freqs(head_dim, theta, spec), rtol=1e-5, atol=0):
            return spec
    raise NotImplementedError(
        f"{source}: tensor {ROPE_FREQS!r} matches no known llama3 RoPE scaling "
        f"(tried {LLAMA3_SCALINGS}); first divisors {rope_freqs[:4].tolist()}")


def llama3_rope_freqs(head_dim: int, theta: float, scaling: tuple) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for a scaling: the divisor each RoPE frequency gets.

    Why: GGUF files carry llama3 scaling only as these divisors; deriving them from the model's
    own `rope_inv_freq` means a file ptjax reads or writes rotates exactly as ptjax does.
    """
    plain = np.asarray(llama.rope_inv_freq(head_dim, theta), np.float64)
    scaled = np.asarray(llama.rope_inv_freq(head_dim, theta, scaling), np.float64)
    return (plain / scaled).astype(np.float32)


def config_from_gguf(metadata: Mapping[str, Any], source: str, tensor_names: Collection[str],
                     rope_freqs: np.ndarray | None = None, **overrides) -> ModelConfig:
    """The `ModelConfig` a GGUF file describes, from its metadata and tensor names.

    Why: a GGUF's metadata is the only statement of its dimensions, and a field ptjax cannot
    honour (partial rotary, YaRN, a sliding window, mixture of experts) would load cleanly and
    compute something else, so each is refused naming the field. `tensor_names` decides tying
    (no `output.weight` means the head reuses the embedding); `rope_freqs` are the values of
    `rope_freqs.weight` when the file has it (Llama 3.1+ scaling). `source` names the file in
    errors; `overrides` set ptjax-only fields such as `dtype="bfloat16"`.
    """
    arch = _field(metadata, "general.architecture", source)
    if arch not in ARCHITECTURES:
        raise NotImplementedError(f"{source}: general.architecture={arch!r} is not supported; "
                                  f"expected one of {list(ARCHITECTURES)}")
    if metadata.get(f"{arch}.expert_count"):
        raise NotImplementedError(f"{source}: {arch}.expert_count={metadata[f'{arch}.expert_count']} "
                                  "(mixture of experts) is not supported")
    hidden = _int_field(metadata, f"{arch}.embedding_length", source)
    heads = _int_field(metadata, f"{arch}.attention.head_count", source)
    head_dim = _int_field(metadata, f"{arch}.attention.key_length", source, hidden // heads)
    for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        if key in metadata and _int_field(metadata, key, source) != head_dim:
            raise NotImplementedError(f"{source}: {key}={metadata[key]} differs from the head dim "
                                      f"{head_dim}; ptjax rotates and attends over the whole head")
    context = _int_field(metadata, f"{arch}.context_length", source, 0)
    window_key = f"{arch}.attention.sliding_window"
    if metadata.get(window_key) and not 0 < context <= _int_field(metadata, window_key, source):
        raise NotImplementedError(f"{source}: {window_key}={metadata[window_key]} is shorter than "
                                  f"the context ({context}); ptjax has no sliding-window attention")
    if f"{arch}.vocab_size" in metadata:
        vocab = _int_field(metadata, f"{arch}.vocab_size", source)
    elif "tokenizer.ggml.tokens" in metadata:
        vocab = len(metadata["tokenizer.ggml.tokens"])
    else:
        raise ValueError(f"{source}: metadata has neither '{arch}.vocab_size' "
                         "nor 'tokenizer.ggml.tokens'")
    theta = _f32(_field(metadata, f"{arch}.rope.freq_base", source, 10000.0))
    scaling = _linear_scaling(metadata, arch, source)
    if ROPE_FREQS in tensor_names:
        if rope_freqs is None:
            raise ValueError(f"{source}: has tensor {ROPE_FREQS!r}; pass its values as rope_freqs")
        if scaling:
            raise NotImplementedError(f"{source}: tensor {ROPE_FREQS!r} together with linear scaling "
                                      "is not supported")
        scaling = _llama3_scaling(rope_freqs, head_dim, theta, source)
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden=hidden,
        mlp=_int_field(metadata, f"{arch}.feed_forward_length", source),
        layers=_int_field(metadata, f"{arch}.block_count", source),
        heads=heads,
        kv_heads=_int_field(metadata, f"{arch}.attention.head_count_kv", source, heads),
        head_dim=head_dim,
        rope_theta=theta,
        norm_eps=_f32(_field(metadata, f"{arch}.attention.layer_norm_rms_epsilon", source)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2",
        rope_scaling=scaling,
        max_position_embeddings=context,
    )
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One GGUF tensor: its name, pytree path, stored numpy shape ([out, in] for matrices),
    whether it is a matrix to transpose, and the head count llama.cpp's converter permuted its
    rows by (0 when not permuted)."""

    name: str
    path: tuple[str, ...]
    stored_shape: tuple[int, ...]
    linear: bool = False
    permuted_heads: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape in ptjax's pytree ([in, out] for matrices)."""
        return self.stored_shape[::-1] if self.linear else self.stored_shape


def _layer_layout(cfg: ModelConfig, i: int) -> Iterator[Tensor]:
    pre, node = f"blk.{i}.", f"layers_{i}"
    d, q_dim, kv_dim = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    permuted = not cfg.qkv_bias  # the llama converter permutes q/k rows; qwen2's does not
    yield Tensor(pre + "attn_norm.weight", (node, "attn_norm", "scale"), (d,))
    for name, width, heads in (("q", q_dim, cfg.heads), ("k", kv_dim, cfg.kv_heads), ("v", kv_dim, 0)):
        yield Tensor(f"{pre}attn_{name}.weight", (node, "attn", name, "kernel"), (width, d), True,
                     heads if permuted else 0)
        if cfg.qkv_bias:
            yield Tensor(f"{pre}attn_{name}.bias", (node, "attn", name, "bias"), (width,))
    yield Tensor(pre + "attn_output.weight", (node, "attn", "o", "kernel"), (d, q_dim), True)
    yield Tensor(pre + "ffn_norm.weight", (node, "mlp_norm", "scale"), (d,))
    for name, shape in (("gate", (cfg.mlp, d)), ("up", (cfg.mlp, d)), ("down", (d, cfg.mlp))):
        yield Tensor(f"{pre}ffn_{name}.weight", (node, "mlp", name, "kernel"), shape, True)


def gguf_layout(cfg: ModelConfig) -> list[Tensor]:
    """Every weight tensor a GGUF file of `cfg` holds, in llama.cpp's converter order.

    Why: loading, saving and the shape checks all need the same name/path/transpose/permute
    table; keeping it in one place is what makes the round trip exact.
    """
    tensors = [Tensor("token_embd.weight", ("embed", "embedding"), (cfg.vocab_size, cfg.hidden))]
    for i in range(cfg.layers):
        tensors.extend(_layer_layout(cfg, i))
    tensors.append(Tensor("output_norm.weight", ("final_norm", "scale"), (cfg.hidden,)))
    if not cfg.tie_embeddings:
        tensors.append(Tensor("output.weight", ("lm_head", "kernel"), (cfg.vocab_size, cfg.hidden),
                              linear=True))
    return tensors


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (per head: interleave the two halves), which
    turns Hugging Face's rotate-half RoPE layout into GGML's adjacent-pair one."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rows`: GGML's adjacent-pair q/k rows back to rotate-half order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- load


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A loaded GGUF file: numpy params in ptjax's layout, their config, and the file's metadata
    (tokenizer fields included)."""

    params: dict
    config: ModelConfig
    metadata: dict


def _stored_shape(info) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(info.shape.tolist()))


def _check_type(info, path: str) -> None:
    if info.tensor_type not in READ_TYPES:
        raise NotImplementedError(
            f"{path}: tensor {info.name!r} has type {info.tensor_type.name}, which ptjax cannot "
            f"read (supported: {', '.join(t.name for t in READ_TYPES)})")


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`gguf.quants.dequantize`, 4x faster: on a plain view of the file (slicing a memmap runs a
    Python hook per slice) and in chunks of `_CHUNK` values instead of 16 rows at a time."""
    data = np.asarray(data)
    if qtype in (Q.F32, Q.F16):
        return dequantize(data, qtype)
    kind = getattr(gguf.quants, qtype.name)
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // kind.type_size * kind.block_size), np.float32)
    step = max(1, _CHUNK // out.shape[1])
    for start in range(0, len(rows), step):
        out[start:start + step] = kind.dequantize_rows(rows[start:start + step])
    return out


def _values(info, path: str) -> np.ndarray:
    """Float32 values of one tensor in its stored numpy shape."""
    _check_type(info, path)
    return _dequantize(info.data, info.tensor_type).reshape(_stored_shape(info))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _check_tensors(infos: Mapping[str, Any], layout: list[Tensor], path: str) -> None:
    """Names, types and shapes against the config, before any weight is read."""
    expected = {t.name for t in layout}
    missing = [t.name for t in layout if t.name not in infos]
    if missing:
        raise ValueError(f"{path}: file has no tensor {missing[0]!r} ({len(missing)} missing in all)")
    extra = [name for name in infos if name not in expected and name != ROPE_FREQS]
    if extra:
        raise NotImplementedError(f"{path}: tensor {extra[0]!r} has no place in ptjax's model "
                                  f"({len(extra)} unexpected in all)")
    for tensor in layout:
        info = infos[tensor.name]
        _check_type(info, path)
        if _stored_shape(info) != tensor.stored_shape:
            raise ValueError(f"{path}: tensor {tensor.name!r} has shape {_stored_shape(info)}, "
                             f"but the config expects {tensor.stored_shape} (numpy order, [out, in])")


def load(path: str, dtype: str = "float32") -> GGUFCheckpoint:
    """Parameters, config and metadata from a GGUF file, dequantized to float32 (or bfloat16).

    Why: many fine-tuned and quantized models are published only as GGUF. Every tensor's name,
    type and shape is checked against the config before anything is read; tensors are then
    dequantized one at a time (peak memory near the size of the result), q/k rows are put back
    in Hugging Face order, and matrices transposed to [in, out], so `llama.forward` on the
    result computes what llama.cpp computes from the file.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(LOAD_DTYPES)}, got {dtype!r}")
    reader = _open(path)
    metadata = _metadata(reader, path)
    infos = {info.name: info for info in reader.tensors}
    rope_freqs = _values(infos[ROPE_FREQS], path) if ROPE_FREQS in infos else None
    cfg = config_from_gguf(metadata, path, infos.keys(), rope_freqs)
    layout = gguf_layout(cfg)
    _check_tensors(infos, layout, path)
    target = LOAD_DTYPES[dtype]
    params: dict = {}
    for tensor in layout:
        value = _values(infos[tensor.name], path)
        if tensor.permuted_heads:
            value = unpermute_rows(value, tensor.permuted_heads)
        value = value.T if tensor.linear else value
        _set(params, tensor.path, value.astype(target, order="C"))
    return GGUFCheckpoint(params=params, config=cfg, metadata=metadata)


# ----------------------------------------------------------------------------- save


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _stored_value(params: Mapping, tensor: Tensor) -> np.ndarray:
    """A param as GGUF stores it: materialized, float32, [out, in], q/k rows permuted."""
    try:
        leaf = _get(params, tensor.path)
    except KeyError:
        raise ValueError(f"params have no {'/'.join(tensor.path)} (needed for {tensor.name})") from None
    value = np.asarray(jax.device_get(ops.materialize(leaf)), np.float32)
    if value.shape != tensor.shape:
        raise ValueError(f"param {'/'.join(tensor.path)} has shape {value.shape}, "
                         f"but the config expects {tensor.shape}")
    value = value.T if tensor.linear else value
    if tensor.permuted_heads:
        value = permute_rows(value, tensor.permuted_heads)
    return np.ascontiguousarray(value)


def _encode(value: np.ndarray, qtype: GGMLQuantizationType, tensor: Tensor):
    """(data, stored type): 1-D tensors stay F32; a Q8_0 matrix whose rows are not a whole number
    of 32-blocks is stored F16, as llama.cpp's converter does."""
    if value.ndim == 1 or qtype == Q.F32:
        return value, Q.F32
    if qtype == Q.Q8_0 and value.shape[-1] % 32 == 0:
        return quantize(value, Q.Q8_0), Q.Q8_0
    half = value.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"param {'/'.join(tensor.path)} has values beyond float16's range "
                         f"(|x| > 65504); save {tensor.name} as F32")
    return half, Q.F16


def _write_metadata(writer: GGUFWriter, cfg: ModelConfig, file_type: int, name: str) -> None:
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings or DEFAULT_CONTEXT)
    writer.add_embedding_length(cfg.hidden)
    writer.add_block_count(cfg.layers)
    writer.add_feed_forward_length(cfg.mlp)
    writer.add_head_count(cfg.heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    spec = dict(cfg.rope_scaling)
    if spec.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(spec["factor"])


def save_gguf(params: Mapping, cfg: ModelConfig, path: str, *, dtype: str = "F16",
              tokenizer_writer: Callable[[GGUFWriter], None] | None = None, name: str = "") -> None:
    """Write `params` as a GGUF file llama.cpp runs (architecture "qwen2" when `cfg.qkv_bias`,
    else "llama").

    Why: trained weights must reach llama.cpp-based serving. `dtype` ("F32", "F16", "Q8_0") is
    the storage of the matrices and the embedding; norms and biases stay F32. Weight nodes (LoRA,
    quantized) are materialized, q/k rows get the converter's permutation for "llama", and llama3
    RoPE scaling is written as llama.cpp's `rope_freqs.weight`. `tokenizer_writer(writer)` adds
    tokenizer and chat-template fields. The file appears only once complete (written under a
    temporary name, then renamed).
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    qtype, file_type = SAVE_DTYPES[dtype]
    arch = "qwen2" if cfg.qkv_bias else "llama"
    partial = f"{path}.partial-{os.getpid()}"
    writer = GGUFWriter(partial, arch)
    try:
        _write_metadata(writer, cfg, file_type, name)
        if dict(cfg.rope_scaling).get("rope_type") == "llama3":
            freqs = llama3_rope_freqs(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            writer.add_tensor(ROPE_FREQS, freqs)
        for tensor in gguf_layout(cfg):
            data, stored = _encode(_stored_value(params, tensor), qtype, tensor)
            writer.add_tensor(tensor.name, data, raw_dtype=stored if stored == Q.Q8_0 else None)
        if tokenizer_writer is not None:
            tokenizer_writer(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        for f in writer.fout or ():
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        if os.path.exists(partial):
            os.remove(partial)

"""GGUF interop: files written by hand with `gguf.GGUFWriter` (the test's own metadata, q/k
permutation and quantized blocks) and round trips through `save_gguf` / `load`.

Block layouts decoded here follow ggml's C structs (ggml-common.h) and `dequantize_row_*`
(ggml-quants.c), written independently of `gguf.quants`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ptjax.interop import gguf_io
from ptjax.models import llama
from ptjax.models.config import ModelConfig, rope_scaling_spec
from ptjax.peft.lora import LoRA

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_gguf_logits.json")

TINY = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2, head_dim=8,
                   rope_theta=10000.0, norm_eps=1e-5, max_position_embeddings=128)
TOKENS = np.array([[1, 5, 9, 33, 2, 60, 7, 7]], np.int32)


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random numpy params in the model's layout (shapes traced from `init_params`, no compile);
    norms are set near 1 and biases small, like a trained model's."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: llama.init_params(cfg, key), jax.random.key(0))
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if "scale" in jax.tree_util.keystr(path):
            leaf += 1.0
    return params


def logits(params, cfg: ModelConfig) -> np.ndarray:
    return np.asarray(llama.forward(params, cfg, TOKENS))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- the test's writer


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: per head, rows [first half, second half]
    become interleaved pairs (row 2i = first-half row i, row 2i+1 = second-half row i)."""
    rows, out = w.shape[0], np.empty_like(w)
    head = rows // n_head
    for h in range(n_head):
        for i in range(head // 2):
            out[h * head + 2 * i] = w[h * head + i]
            out[h * head + 2 * i + 1] = w[h * head + head // 2 + i]
    return out


def stored_tensors(params, cfg: ModelConfig, permute: bool = True) -> dict[str, np.ndarray]:
    """GGUF name -> float32 tensor as llama.cpp's converter stores it ([out, in])."""
    out = {"token_embd.weight": params["embed"]["embedding"],
           "output_norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = params["lm_head"]["kernel"].T
    for i in range(cfg.layers):
        p, pre = params[f"layers_{i}"], f"blk.{i}."
        out[pre + "attn_norm.weight"] = p["attn_norm"]["scale"]
        out[pre + "ffn_norm.weight"] = p["mlp_norm"]["scale"]
        for name, key in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            w = p["attn"][name]["kernel"].T
            if permute and name in "qk":
                w = converter_permute(w, cfg.heads if name == "q" else cfg.kv_heads)
            out[f"{pre}{key}.weight"] = w
            if "bias" in p["attn"][name]:
                out[f"{pre}{key}.bias"] = p["attn"][name]["bias"]
        for name in ("gate", "up", "down"):
            out[f"{pre}ffn_{name}.weight"] = p["mlp"][name]["kernel"].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def model_metadata(cfg: ModelConfig, arch: str = "llama") -> dict:
    return {
        f"{arch}.context_length": (cfg.max_position_embeddings, "u32"),
        f"{arch}.embedding_length": (cfg.hidden, "u32"),
        f"{arch}.block_count": (cfg.layers, "u32"),
        f"{arch}.feed_forward_length": (cfg.mlp, "u32"),
        f"{arch}.attention.head_count": (cfg.heads, "u32"),
        f"{arch}.attention.head_count_kv": (cfg.kv_heads, "u32"),
        f"{arch}.attention.key_length": (cfg.head_dim, "u32"),
        f"{arch}.rope.dimension_count": (cfg.head_dim, "u32"),
        f"{arch}.rope.freq_base": (cfg.rope_theta, "f32"),
        f"{arch}.attention.layer_norm_rms_epsilon": (cfg.norm_eps, "f32"),
        f"{arch}.vocab_size": (cfg.vocab_size, "u32"),
    }


def write_gguf(path, tensors: dict, metadata: dict, arch: str = "llama") -> str:
    """Write `tensors` (name -> float array, or (raw uint8 blocks, quant type)) and `metadata`
    (key -> (value, "u32" | "f32" | "str")) with the gguf package's writer."""
    writer = gguf.GGUFWriter(str(path), arch)
    adders = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string}
    for key, (value, kind) in metadata.items():
        adders[kind](key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def write_model(path, cfg: ModelConfig, params=None, arch: str = "llama", extra=None, drop=(),
                replace=None) -> str:
    """A whole model file in float32, with metadata fields added (`extra`) or removed (`drop`)
    and tensors replaced, added or (value None) removed (`replace`)."""
    tensors = stored_tensors(params if params is not None else random_params(cfg), cfg,
                             permute=arch == "llama")
    for name, value in (replace or {}).items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    metadata = {k: v for k, v in model_metadata(cfg, arch).items() if k not in drop}
    metadata.update(extra or {})
    return write_gguf(path, tensors, metadata, arch)


def file_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


# ----------------------------------------------------------------------------- independent decoders


def f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 from uint8 pairs along the last axis, as float32."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)[..., 0]


def decode_q8_0(raw: np.ndarray) -> np.ndarray:
    """block_q8_0 {f16 d; int8 qs[32]}: x = d * q."""
    blocks = raw.reshape(-1, 34)
    return (f16(blocks[:, :2])[:, None] * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)


def decode_q4_0(raw: np.ndarray) -> np.ndarray:
    """block_q4_0 {f16 d; u8 qs[16]}: element j < 16 is the low nibble of qs[j], element j + 16
    the high nibble; x = d * (q - 8)."""
    out = []
    for block in raw.reshape(-1, 18):
        d, qs = f16(block[None, :2])[0], block[2:].astype(np.int32)
        q = np.concatenate([qs & 0xF, qs >> 4])
        out.append(d * (q - 8).astype(np.float32))
    return np.concatenate(out)


def decode_q4_1(raw: np.ndarray) -> np.ndarray:
    """block_q4_1 {f16 d; f16 m; u8 qs[16]}: nibbles as Q4_0, x = d * q + m."""
    out = []
    for block in raw.reshape(-1, 20):
        d, m, qs = f16(block[None, :2])[0], f16(block[None, 2:4])[0], block[4:].astype(np.int32)
        q = np.concatenate([qs & 0xF, qs >> 4]).astype(np.float32)
        out.append(d * q + m)
    return np.concatenate(out)


def k_scale_min(scales: np.ndarray, j: int) -> tuple[int, int]:
    """ggml's get_scale_min_k4: 6-bit scale and min of sub-block j from the 12 packed bytes."""
    q = [int(v) for v in scales]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def decode_q4_k(raw: np.ndarray) -> np.ndarray:
    """block_q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}, dequantize_row_q4_K."""
    out = []
    for block in raw.reshape(-1, 144):
        d, dmin = f16(block[None, :2])[0], f16(block[None, 2:4])[0]
        scales, qs = block[4:16], block[16:]
        for n in range(4):  # 64 values per step: low nibbles, then high nibbles of 32 bytes
            q = qs[32 * n:32 * n + 32].astype(np.int32)
            for half, vals in enumerate((q & 0xF, q >> 4)):
                sc, m = k_scale_min(scales, 2 * n + half)
                out.append(np.float32(d * np.float32(sc)) * vals.astype(np.float32)
                           - np.float32(dmin * np.float32(m)))
    return np.concatenate(out).astype(np.float32)


def decode_q5_k(raw: np.ndarray) -> np.ndarray:
    """block_q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}, dequantize_row_q5_K:
    the fifth bit of value l in step n is bit 2n (low nibbles) or 2n+1 (high) of qh[l]."""
    out = []
    for block in raw.reshape(-1, 176):
        d, dmin = f16(block[None, :2])[0], f16(block[None, 2:4])[0]
        scales, qh, qs = block[4:16], block[16:48].astype(np.int32), block[48:].astype(np.int32)
        for n in range(4):
            q = qs[32 * n:32 * n + 32]
            for half, low in enumerate((q & 0xF, q >> 4)):
                high = (qh >> (2 * n + half)) & 1
                sc, m = k_scale_min(scales, 2 * n + half)
                vals = (low + 16 * high).astype(np.float32)
                out.append(np.float32(d * np.float32(sc)) * vals - np.float32(dmin * np.float32(m)))
    return np.concatenate(out).astype(np.float32)


def decode_q6_k(raw: np.ndarray) -> np.ndarray:
    """block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}, dequantize_row_q6_K."""
    out = []
    for block in raw.reshape(-1, 210):
        ql, qh = block[:128].astype(np.int32), block[128:192].astype(np.int32)
        sc, d = block[192:208].view(np.int8).astype(np.float32), f16(block[None, 208:210])[0]
        y = np.zeros(256, np.float32)
        for n in range(2):  # two halves of 128 values
            l_, h_, s_ = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8]
            for l in range(32):
                is_ = l // 16
                q1 = ((l_[l] & 0xF) | (((h_[l] >> 0) & 3) << 4)) - 32
                q2 = ((l_[l + 32] & 0xF) | (((h_[l] >> 2) & 3) << 4)) - 32
                q3 = ((l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4)) - 32
                q4 = ((l_[l + 32] >> 4) | (((h_[l] >> 6) & 3) << 4)) - 32
                base = 128 * n
                y[base + l] = d * s_[is_] * q1
                y[base + l + 32] = d * s_[is_ + 2] * q2
                y[base + l + 64] = d * s_[is_ + 4] * q3
                y[base + l + 96] = d * s_[is_ + 6] * q4
        out.append(y)
    return np.concatenate(out)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, "<f2").reshape(-1, 1).view(np.uint8)


def random_blocks(qtype: Q, n_blocks: int, rng) -> np.ndarray:
    """Random raw blocks of `qtype` with sane float16 scales (small positive d, dmin, m)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale = lambda: f16_bytes(rng.uniform(1e-3, 2e-2, n_blocks))  # noqa: E731
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.IQ4_NL):
        raw[:, :2] = scale()
    if qtype in (Q.Q4_1, Q.Q4_K, Q.Q5_K):
        raw[:, 2:4] = f16_bytes(rng.uniform(-2e-2, 2e-2, n_blocks)) if qtype == Q.Q4_1 else scale()
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[:, :2] = scale()
    if qtype == Q.Q6_K:
        raw[:, 208:210] = scale()
    if qtype == Q.Q2_K:
        raw[:, 80:84] = np.concatenate([scale(), scale()], axis=1)
    return raw


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", [
    dict(),
    dict(tie_embeddings=True),
    dict(qkv_bias=True),
])
def test_f32_round_trip_is_exact(tmp_path, variant):
    cfg = dataclasses.replace(TINY, **variant)
    params = random_params(cfg, 1)
    if cfg.qkv_bias:
        for i in range(cfg.layers):
            for name in "qkv":
                params[f"layers_{i}"]["attn"][name]["bias"] += 0.1
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(params, cfg, path, dtype="F32", name="tiny")
    ck = gguf_io.load(path)
    assert ck.config == cfg
    assert ck.metadata["general.architecture"] == ("qwen2" if cfg.qkv_bias else "llama")
    assert ck.metadata["general.name"] == "tiny"
    written, converted = file_tensors(path), stored_tensors(params, cfg, permute=not cfg.qkv_bias)
    assert set(written) == set(converted)  # output.weight only when untied
    for name, info in written.items():  # layout and q/k permutation as the converter writes them
        np.testing.assert_array_equal(info.data, converted[name], err_msg=name)
    assert_trees_equal(ck.params, params)
    if not variant:
        np.testing.assert_array_equal(logits(ck.params, ck.config), logits(params, cfg))
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_f16_round_trip_rounds_matrices_only(tmp_path):
    params = random_params(TINY, 2)
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(params, TINY, path)  # F16 by default
    types = {name: t.tensor_type for name, t in file_tensors(path).items()}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == Q.F16
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32
    ck = gguf_io.load(path)
    expected = jax.tree.map(lambda x: x if x.ndim == 1 else x.astype(np.float16).astype(np.float32),
                            params)
    assert_trees_equal(ck.params, expected)
    np.testing.assert_allclose(logits(ck.params, ck.config), logits(params, TINY), atol=2e-2, rtol=0)


def test_q8_0_matches_block_decode_and_quantization_error(tmp_path):
    cfg = dataclasses.replace(TINY, hidden=64)  # every row a multiple of 32
    params = random_params(cfg, 3)
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(params, cfg, path, dtype="Q8_0")
    ck = gguf_io.load(path)
    written = file_tensors(path)
    original = stored_tensors(params, cfg)
    loaded = stored_tensors(ck.params, cfg)
    for name, info in written.items():
        if info.tensor_type == Q.F32:
            assert original[name].ndim == 1
            np.testing.assert_array_equal(loaded[name], original[name])
            continue
        assert info.tensor_type == Q.Q8_0, name
        decoded = decode_q8_0(np.asarray(info.data)).reshape(original[name].shape)
        np.testing.assert_array_equal(loaded[name], decoded, err_msg=name)
        blocks = original[name].reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert (np.abs(decoded.reshape(-1, 32) - blocks) <= 0.57 * step).all(), name


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tmp_path):
    cfg = dataclasses.replace(TINY, mlp=48)  # ffn_down rows hold 48 values
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(random_params(cfg), cfg, path, dtype="Q8_0")
    types = {name: t.tensor_type for name, t in file_tensors(path).items()}
    assert types["blk.0.ffn_down.weight"] == Q.F16
    assert types["blk.0.ffn_up.weight"] == Q.Q8_0
    assert gguf_io.load(path).config == cfg


def test_bfloat16_load_and_lora_materialized_on_save(tmp_path):
    params = random_params(TINY, 4)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 2)).astype(np.float32)
    b = rng.standard_normal((2, 32)).astype(np.float32)
    base = params["layers_1"]["attn"]["o"]["kernel"]
    params["layers_1"]["attn"]["o"]["kernel"] = LoRA(base=base, a=a, b=b, scale=0.5)
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(params, TINY, path, dtype="F32")
    ck = gguf_io.load(path, dtype="bfloat16")
    loaded = ck.params["layers_1"]["attn"]["o"]["kernel"]
    assert loaded.dtype == ml_dtypes.bfloat16
    expected = base + 0.5 * np.dot(a, b)
    np.testing.assert_allclose(loaded.astype(np.float32), expected, rtol=2**-8, atol=1e-6)
    with pytest.raises(ValueError, match="float16"):
        gguf_io.load(path, dtype="float16")


def test_tokenizer_writer_fields_and_metadata_types(tmp_path):
    tokens = [f"tok{i}" for i in range(64)] + ["ü", ""]

    def add_tokenizer(writer):
        writer.add_token_list(tokens)
        writer.add_token_types([1] * len(tokens))
        writer.add_token_scores([0.5] * len(tokens))
        writer.add_bool("tokenizer.ggml.add_bos_token", True)
        writer.add_chat_template("{{ messages }}")
        writer.add_array("test.nested", [[1, 2], [3]])

    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(random_params(TINY), TINY, path, tokenizer_writer=add_tokenizer)
    metadata = gguf_io.read_metadata(path)
    assert metadata["tokenizer.ggml.tokens"] == tokens
    assert metadata["tokenizer.ggml.token_type"] == [1] * len(tokens)
    assert metadata["tokenizer.ggml.scores"] == [0.5] * len(tokens)
    assert metadata["tokenizer.ggml.add_bos_token"] is True
    assert metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert metadata["test.nested"] == [[1, 2], [3]]
    assert metadata["llama.context_length"] == 128 and metadata["general.file_type"] == 1
    reference = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
                 if not k.startswith("GGUF.") and k != "test.nested"}
    assert {k: v for k, v in metadata.items() if k != "test.nested"} == reference


class CrashingWriter(gguf.GGUFWriter):
    """Dies halfway through the tensor data, as a full disk or a kill would."""

    def write_tensors_to_file(self, **kwargs):
        self.fout[0].write(b"half a tensor")
        raise OSError("disk full")


def test_failed_save_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = str(tmp_path / "m.gguf")
    with open(path, "wb") as f:
        f.write(b"old")

    def broken(writer):
        raise RuntimeError("tokenizer failed")

    with pytest.raises(RuntimeError, match="tokenizer failed"):
        gguf_io.save_gguf(random_params(TINY), TINY, path, tokenizer_writer=broken)
    monkeypatch.setattr(gguf_io, "GGUFWriter", CrashingWriter)
    with pytest.raises(OSError, match="disk full"):
        gguf_io.save_gguf(random_params(TINY), TINY, path)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["m.gguf"]


# ----------------------------------------------------------------------------- q/k permutation


def test_converter_permutation_is_undone(tmp_path, monkeypatch):
    params = random_params(TINY, 5)
    expected = logits(params, TINY)
    path = write_model(tmp_path / "m.gguf", TINY, params)  # q/k permuted by the test's converter
    ck = gguf_io.load(path)
    assert ck.config == TINY
    assert_trees_equal(ck.params, params)
    np.testing.assert_array_equal(logits(ck.params, ck.config), expected)
    monkeypatch.setattr(gguf_io, "unpermute_rows", lambda w, heads: w)
    skipped = gguf_io.load(path)
    assert np.abs(logits(skipped.params, skipped.config) - expected).max() > 1e-2


def test_qwen2_is_not_permuted(tmp_path):
    cfg = dataclasses.replace(TINY, qkv_bias=True)
    params = random_params(cfg, 6)
    path = write_model(tmp_path / "m.gguf", cfg, params, arch="qwen2")
    ck = gguf_io.load(path)
    assert ck.config == cfg
    assert_trees_equal(ck.params, params)


# ----------------------------------------------------------------------------- dequantizers


@pytest.mark.parametrize("qtype, decode", [
    (Q.Q8_0, decode_q8_0), (Q.Q4_0, decode_q4_0), (Q.Q4_1, decode_q4_1),
    (Q.BF16, lambda raw: raw.view(ml_dtypes.bfloat16).astype(np.float32).reshape(-1)),
])
def test_block_quants_against_own_decode(tmp_path, monkeypatch, qtype, decode):
    monkeypatch.setattr(gguf_io, "_CHUNK", 100)  # several chunks per tensor, the last one short
    rng = np.random.default_rng(int(qtype))
    shape = (TINY.mlp, TINY.hidden)  # ffn_gate, stored [out, in]
    if qtype == Q.BF16:
        raw = rng.standard_normal(shape).astype(ml_dtypes.bfloat16).view(np.uint8)
    else:
        raw = random_blocks(qtype, shape[0] * shape[1] // 32, rng).reshape(shape[0], -1)
    path = write_model(tmp_path / "m.gguf", TINY, replace={"blk.1.ffn_gate.weight": (raw, qtype)})
    ck = gguf_io.load(path)
    expected = decode(raw).reshape(shape)
    assert np.abs(expected).max() > 0
    np.testing.assert_array_equal(ck.params["layers_1"]["mlp"]["gate"]["kernel"], expected.T)


KCFG = ModelConfig(vocab_size=16, hidden=256, mlp=64, layers=1, heads=4, kv_heads=2, head_dim=8,
                   max_position_embeddings=64)


@pytest.mark.parametrize("qtype, decode", [(Q.Q4_K, decode_q4_k), (Q.Q5_K, decode_q5_k),
                                           (Q.Q6_K, decode_q6_k)])
def test_k_quants_against_gguf_and_own_decode(tmp_path, monkeypatch, qtype, decode):
    monkeypatch.setattr(gguf_io, "_CHUNK", 3 * 256)
    rng = np.random.default_rng(int(qtype))
    shape = (KCFG.mlp, KCFG.hidden)  # one 256-value super-block per row
    raw = random_blocks(qtype, shape[0], rng)
    path = write_model(tmp_path / "m.gguf", KCFG, replace={"blk.0.ffn_up.weight": (raw, qtype)})
    loaded = gguf_io.load(path).params["layers_0"]["mlp"]["up"]["kernel"].T
    reference = gguf.quants.dequantize(raw, qtype).reshape(shape)
    np.testing.assert_array_equal(loaded, reference)
    own = decode(raw[:4]).reshape(4, -1)  # four blocks decoded the C way
    np.testing.assert_allclose(loaded[:4], own, rtol=1e-6, atol=1e-9)
    assert np.abs(own).max() > 0


# ----------------------------------------------------------------------------- RoPE scaling


def converter_rope_freqs(head_dim, base, factor, low, high, old_len) -> np.ndarray:
    """convert_hf_to_gguf.py's llama3 `rope_freqs` (its loop, in Python floats)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = float(np.float32(1.0 / (base ** (i / head_dim))))
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_scaling_round_trip_and_converter_file(tmp_path, factor):
    fields = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
    cfg = dataclasses.replace(TINY, rope_theta=500000.0, max_position_embeddings=131072,
                              rope_scaling=rope_scaling_spec("llama3", **fields))
    reference = converter_rope_freqs(cfg.head_dim, cfg.rope_theta, factor, 1.0, 4.0, 8192)
    assert 1.0 < reference[2] < factor and reference[0] == 1.0 and reference[-1] == factor
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(random_params(cfg), cfg, path)
    written = np.asarray(file_tensors(path)["rope_freqs.weight"].data)
    np.testing.assert_allclose(written, reference, rtol=1e-6)
    assert gguf_io.load(path).config == cfg
    converted = write_model(tmp_path / "c.gguf", dataclasses.replace(cfg, rope_scaling=()),
                            replace={"rope_freqs.weight": reference})
    assert gguf_io.load(converted).config == cfg


def test_linear_scaling_round_trip_and_unscaled_rope_freqs(tmp_path):
    cfg = dataclasses.replace(TINY, rope_scaling=rope_scaling_spec("linear", factor=4.0))
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(random_params(cfg), cfg, path)
    metadata = gguf_io.read_metadata(path)
    assert metadata["llama.rope.scaling.type"] == "linear"
    assert gguf_io.load(path).config == cfg
    ones = write_model(tmp_path / "ones.gguf", TINY,
                       replace={"rope_freqs.weight": np.ones(4, np.float32)})
    assert gguf_io.load(ones).config == TINY


# ----------------------------------------------------------------------------- refusals


def refused(path, *names, error=ValueError):
    """Loading `path` raises `error` whose message names the file and every one of `names`."""
    with pytest.raises(error) as info:
        gguf_io.load(str(path))
    message = str(info.value)
    for name in (str(path), *names):
        assert name in message, f"{name!r} not in {message!r}"
    return message


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.IQ4_NL])
def test_refuses_unsupported_tensor_type(tmp_path, qtype):
    raw = random_blocks(qtype, TINY.mlp * TINY.hidden // 32, np.random.default_rng(0))
    path = write_model(tmp_path / "m.gguf", TINY,
                       replace={"blk.0.ffn_up.weight": (raw.reshape(TINY.mlp, -1), qtype)})
    refused(path, "blk.0.ffn_up.weight", qtype.name, error=NotImplementedError)


def test_refuses_unsupported_k_quant(tmp_path):
    raw = random_blocks(Q.Q2_K, KCFG.mlp, np.random.default_rng(0))
    path = write_model(tmp_path / "m.gguf", KCFG, replace={"blk.0.ffn_gate.weight": (raw, Q.Q2_K)})
    refused(path, "blk.0.ffn_gate.weight", "Q2_K", error=NotImplementedError)


def test_refuses_missing_extra_and_misshapen_tensors(tmp_path):
    missing = write_model(tmp_path / "a.gguf", TINY, replace={"blk.1.ffn_up.weight": None})
    refused(missing, "blk.1.ffn_up.weight")
    extra = write_model(tmp_path / "b.gguf", TINY,
                        replace={"blk.0.attn_output.bias": np.zeros(32, np.float32)})
    refused(extra, "blk.0.attn_output.bias", error=NotImplementedError)
    shaped = write_model(tmp_path / "c.gguf", TINY,
                         replace={"blk.1.ffn_down.weight": np.zeros((32, 63), np.float32)})
    refused(shaped, "blk.1.ffn_down.weight", "(32, 63)", "(32, 64)")


def test_refuses_truncated_and_corrupt_files(tmp_path):
    path = write_model(tmp_path / "m.gguf", TINY)
    data = open(path, "rb").read()
    for n, cut in enumerate((40, len(data) // 2, len(data) - 64)):
        short = tmp_path / f"short{n}.gguf"
        short.write_bytes(data[:cut])
        refused(short, "GGUF")
        with pytest.raises(ValueError, match=re.escape(str(short))):
            gguf_io.read_metadata(str(short))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGML" + data[4:])
    refused(corrupt, "GGUF")


def test_truncated_string_array_is_named(tmp_path):
    """A file cut inside a string of a metadata array fails there, not with a shortened string."""
    writer = gguf.GGUFWriter(str(tmp_path / "full.gguf"), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["alpha", "beta", "a-long-last-token-string"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = (tmp_path / "full.gguf").read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:data.index(b"a-long-last-token-string") + 6])
    with pytest.raises(ValueError, match=re.escape(str(short)) + ".*runs past the end"):
        gguf_io.read_metadata(str(short))


@pytest.mark.parametrize("change, names, error", [
    (dict(arch="gemma"), ["general.architecture", "gemma"], NotImplementedError),
    (dict(extra={"llama.rope.dimension_count": (4, "u32")}), ["llama.rope.dimension_count"],
     NotImplementedError),
    (dict(extra={"llama.rope.scaling.type": ("yarn", "str"),
                 "llama.rope.scaling.factor": (4.0, "f32")}),
     ["llama.rope.scaling.type", "yarn"], NotImplementedError),
    (dict(extra={"llama.attention.sliding_window": (64, "u32")}), ["llama.attention.sliding_window"],
     NotImplementedError),
    (dict(extra={"llama.expert_count": (8, "u32")}), ["llama.expert_count"], NotImplementedError),
    (dict(drop=["llama.attention.layer_norm_rms_epsilon"]), ["llama.attention.layer_norm_rms_epsilon"],
     ValueError),
    (dict(replace={"rope_freqs.weight": np.array([1.0, 1.5, 2.0, 8.0], np.float32)}),
     ["rope_freqs.weight"], NotImplementedError),
    (dict(replace={"rope_freqs.weight": np.ones(3, np.float32)}),
     ["rope_freqs.weight", "has 3 entries", "needs 4"], ValueError),
])
def test_refuses_metadata_it_cannot_honour(tmp_path, change, names, error):
    arch = change.get("arch", "llama")
    path = write_model(tmp_path / "m.gguf", TINY, arch=arch, extra=change.get("extra"),
                       drop=change.get("drop", ()), replace=change.get("replace"))
    refused(path, *names, error=error)


def test_long_sliding_window_and_missing_vocab_size(tmp_path):
    cfg = TINY
    path = write_model(tmp_path / "m.gguf", cfg, drop=["llama.vocab_size"],
                       extra={"llama.attention.sliding_window": (128, "u32")})
    refused(path, "llama.vocab_size", "tokenizer.ggml.tokens")
    metadata = gguf_io.read_metadata(path)
    metadata["tokenizer.ggml.tokens"] = ["t"] * cfg.vocab_size
    names = set(file_tensors(path))
    assert gguf_io.config_from_gguf(metadata, path, names) == cfg
    assert gguf_io.config_from_gguf(metadata, path, names, dtype="bfloat16").dtype == "bfloat16"


def test_head_dim_default_and_per_layer_head_counts(tmp_path):
    path = write_model(tmp_path / "m.gguf", TINY)
    metadata, names = gguf_io.read_metadata(path), set(file_tensors(path))
    del metadata["llama.attention.key_length"]  # older files: head_dim = hidden / heads
    assert gguf_io.config_from_gguf(metadata, path, names) == TINY
    metadata["llama.attention.head_count"] = [TINY.heads] * TINY.layers  # per-layer, all equal
    assert gguf_io.config_from_gguf(metadata, path, names) == TINY
    metadata["llama.attention.head_count"] = [TINY.heads, 2 * TINY.heads]
    with pytest.raises(NotImplementedError, match="llama.attention.head_count.*varies per layer"):
        gguf_io.config_from_gguf(metadata, path, names)


# ----------------------------------------------------------------------------- real model (opt-in)


@pytest.mark.skipif(not os.environ.get("PTJAX_SMOLLM2_GGUF"),
                    reason="set PTJAX_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf")
def test_smollm2_matches_transformers():
    """Logits recorded from transformers (float32, `from_pretrained(gguf_file=...)`), same file."""
    ck = gguf_io.load(os.environ["PTJAX_SMOLLM2_GGUF"])
    cfg = ck.config
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    with open(FIXTURE) as f:
        fixture = json.load(f)
    with jax.default_matmul_precision("highest"):
        last = np.asarray(llama.forward(ck.params, cfg, np.array([fixture["ids"]], np.int32)))[0, -1]
    np.testing.assert_array_equal(np.argsort(-last)[:5], fixture["top5_ids"])
    np.testing.assert_allclose(last[fixture["top5_ids"]], fixture["top5_logits"], atol=1e-3, rtol=0)

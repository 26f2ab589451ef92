"""`llama.forward` against an independent float64 numpy transcription of Hugging Face's Llama.

The reference reads the Hugging Face weights dict directly (names, [out, in] layout), so it checks
the model and the checkpoint mapping together: a wrong transpose, RoPE convention, KV-head
grouping or mask would show up as a logits mismatch.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from ptjax.interop import hf
from ptjax.models import llama

forward = jax.jit(llama.forward, static_argnums=1)

BASE = {
    "model_type": "llama", "vocab_size": 37, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}
CASES = {
    "untied_gqa": {},
    "tied": {"tie_word_embeddings": True, "rope_parameters": None, "rope_theta": 500000.0},
    "qwen2_bias": {"model_type": "qwen2", "num_key_value_heads": 4},
}


# ----------------------------------------------------------------------------- HF checkpoint


def random_hf_weights(c: dict, seed: int) -> dict[str, np.ndarray]:
    """Float32 weights under HF names, scaled so activations stay O(1) and attention is not flat."""
    rng = np.random.default_rng(seed)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]

    def mat(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)

    def vec(n, center, spread):
        return center + spread * rng.standard_normal(n)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, d)), "model.norm.weight": vec(d, 1, 0.1)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": vec(d, 1, 0.1),
            p + "post_attention_layernorm.weight": vec(d, 1, 0.1),
            p + "self_attn.q_proj.weight": 2 * mat(q, d), p + "self_attn.k_proj.weight": 2 * mat(kv, d),
            p + "self_attn.v_proj.weight": mat(kv, d), p + "self_attn.o_proj.weight": mat(d, q),
            p + "mlp.gate_proj.weight": mat(f, d), p + "mlp.up_proj.weight": mat(f, d),
            p + "mlp.down_proj.weight": mat(d, f),
        })
        if c["model_type"] == "qwen2":
            for name, n in (("q", q), ("k", kv), ("v", kv)):
                w[f"{p}self_attn.{name}_proj.bias"] = vec(n, 0, 0.5)
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(v, d)
    return {k: x.astype(np.float32) for k, x in w.items()}


def write_checkpoint(folder, c: dict, weights: dict) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(c))
    save_file(weights, str(folder / "model.safetensors"))
    return str(folder)


# ----------------------------------------------------------------------------- reference


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x):
    return x / (1 + np.exp(-x))


def reference_attention(w, p, c, h, cos, sin):
    """HF LlamaAttention for one sequence h [s, hidden]: heads [n, s, d], repeat_kv, causal."""
    s, hd = h.shape[0], c["head_dim"]
    n_heads, n_kv = c["num_attention_heads"], c["num_key_value_heads"]

    def proj(name, n):
        y = h @ w[f"{p}self_attn.{name}_proj.weight"].T
        y = y + w.get(f"{p}self_attn.{name}_proj.bias", 0.0)
        return y.reshape(s, n, hd).transpose(1, 0, 2)

    q, k, v = proj("q", n_heads), proj("k", n_kv), proj("v", n_kv)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, n_heads // n_kv, axis=0), np.repeat(v, n_heads // n_kv, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    out = (softmax(scores) @ v).transpose(1, 0, 2).reshape(s, n_heads * hd)
    return out @ w[f"{p}self_attn.o_proj.weight"].T


def reference_logits(weights: dict, c: dict, tokens) -> np.ndarray:
    """Float64 logits [s, vocab] of one unpadded sequence, positions 0..s-1."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    eps, hd = c["rms_norm_eps"], c["head_dim"]
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta"))
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    freqs = np.outer(np.arange(len(tokens)), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        x = x + reference_attention(w, p, c, h, cos, sin)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        up = silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + up @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def rel_err(actual, expected) -> float:
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


# ----------------------------------------------------------------------------- tests


def load_case(tmp_path, name: str, seed: int, **overrides):
    c = {**BASE, **CASES[name]}
    weights = random_hf_weights(c, seed)
    folder = write_checkpoint(tmp_path / name, c, weights)
    cfg = hf.config_from_hf(folder, **overrides)
    return c, weights, cfg, hf.load_params(folder, cfg)


@pytest.mark.parametrize("causal_block", [0, 4], indirect=True)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_hf_reference(tmp_path, name, causal_block):
    if causal_block:
        assert llama.causal_query_blocks(12) == [(0, 4), (4, 8), (8, 12)]
    c, weights, cfg, params = load_case(tmp_path, name, seed=len(name))
    tokens = np.random.default_rng(0).integers(0, c["vocab_size"], (2, 12))
    logits = np.asarray(forward(params, cfg, tokens))
    assert logits.dtype == np.float32
    for row, ids in zip(logits, tokens):
        expected = reference_logits(weights, c, ids)
        assert np.abs(expected).max() > 1.0  # a meaningful scale, not near-zero logits
        assert rel_err(row, expected) < 1e-4


@pytest.mark.parametrize("causal_block", [0, 5], indirect=True)
def test_packed_row_matches_separate_examples(tmp_path, causal_block):
    if causal_block:
        assert llama.causal_query_blocks(12) == [(0, 6), (6, 12)]
    c, weights, cfg, params = load_case(tmp_path, "untied_gqa", seed=7)
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, c["vocab_size"], 5), rng.integers(0, c["vocab_size"], 4)
    pad = 3
    tokens = np.concatenate([first, second, np.zeros(pad, int)])[None]
    positions = np.concatenate([np.arange(5), np.arange(4), np.zeros(pad, int)])[None]
    segments = np.array([[1] * 5 + [2] * 4 + [0] * pad])
    logits = np.asarray(forward(params, cfg, tokens, positions, segments))[0]
    assert np.isfinite(logits).all()  # padding rows see no key; they must not produce NaN
    assert rel_err(logits[:5], reference_logits(weights, c, first)) < 1e-4
    assert rel_err(logits[5:9], reference_logits(weights, c, second)) < 1e-4


def test_bfloat16_compute_close_to_reference(tmp_path):
    c, weights, cfg, params = load_case(tmp_path, "untied_gqa", seed=11, dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    tokens = np.random.default_rng(2).integers(0, c["vocab_size"], (1, 12))
    logits = np.asarray(forward(params, cfg, tokens))[0]
    assert logits.dtype == np.float32
    assert rel_err(logits, reference_logits(weights, c, tokens[0])) < 3e-2

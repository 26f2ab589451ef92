"""Plain-JAX references for tests, written independently of `ptjax.ops` and `ptjax.models.llama`.

No custom VJPs, no fused or chunked kernels, no grouped-query layout tricks: einsums, an explicit
[b, heads, s, s] attention matrix with a -inf mask, KV heads repeated to every query head, and
`jax.nn.log_softmax` over full logits. Run it under `jax.enable_x64(True)` with float64 inputs to
get float64 values *and* float64 autodiff gradients to compare the train step against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _rms_norm(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
    """Rotate-half RoPE, x [b, s, h, d]: pairs (i, i + d/2) rotate by position * theta^(-2i/d)."""
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(d // 2, dtype=x.dtype) * 2.0 / d)
    ang = positions[..., None].astype(x.dtype) * freq  # [b, s, d/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    lo, hi = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)


def logits(params, cfg, tokens, positions, segment_ids):
    """[b, s, vocab] logits of the ptjax parameter tree (plain arrays only), packed rows allowed:
    token i attends to j iff j <= i and both are in the same non-zero segment."""
    dt = params["embed"]["embedding"].dtype
    b, s = tokens.shape
    x = params["embed"]["embedding"][tokens]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    allowed = (causal[None] & same)[:, None]  # [b, 1, s, s]
    for i in range(cfg.layers):
        p = params[f"layers_{i}"]
        h = _rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)

        def proj(name, heads):
            y = h @ p["attn"][name]["kernel"]
            if "bias" in p["attn"][name]:
                y = y + p["attn"][name]["bias"]
            return y.reshape(b, s, heads, cfg.head_dim)

        q = _rope(proj("q", cfg.heads), positions, cfg.rope_theta)
        k = _rope(proj("k", cfg.kv_heads), positions, cfg.rope_theta)
        v = proj("v", cfg.kv_heads)
        k = jnp.repeat(k, cfg.groups, axis=2)  # query head j uses KV head j // groups
        v = jnp.repeat(v, cfg.groups, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        scores = jnp.where(allowed, scores, -jnp.inf)
        # Padding queries see nothing; give them a uniform row instead of NaN (never in the loss).
        scores = jnp.where(jnp.any(allowed, -1, keepdims=True), scores, 0.0)
        probs = jax.nn.softmax(scores, axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1)
        x = x + attn @ p["attn"]["o"]["kernel"]
        h = _rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
        m = p["mlp"]
        x = x + (jax.nn.silu(h @ m["gate"]["kernel"]) * (h @ m["up"]["kernel"])) @ m["down"]["kernel"]
    x = _rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
    head = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
    return (x @ head).astype(dt)


def mean_nll(params, cfg, batch):
    """Mean next-token NLL over loss tokens of a packed batch (the SFT objective)."""
    out = logits(params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(out, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["loss_mask"].astype(out.dtype)
    return jnp.sum(nll * w) / jnp.sum(w)


def loss_and_grads_f64(params, cfg, batch):
    """(loss, gradient tree) of `mean_nll` in float64 autodiff, returned as numpy float64."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        b64 = {k: jnp.asarray(v) for k, v in batch.items()}
        loss, grads = jax.value_and_grad(mean_nll)(p64, cfg, b64)
        return float(loss), jax.tree.map(np.asarray, grads)

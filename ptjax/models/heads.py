"""Heads on the decoder body: scalar heads (reward, value) and classification heads.

A head reads the final hidden states (the one explicit hook besides input embeddings and the KV
cache) at each sequence's last real token. Heads are ordinary entries of the parameter tree
(`params["score_head"]`), so freezing the body and training only a head is a regex:
`^score_head/`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax.models import llama

F32 = jnp.float32


def add_head(params, cfg, key, *, name: str = "score_head", outputs: int = 1):
    """A new linear head [hidden, outputs] (+ bias) under `params[name]`: outputs=1 is a scalar
    head (reward model, PPO value), outputs=k a k-way classifier. Replaces an existing one."""
    kernel = jax.random.normal(key, (cfg.hidden, outputs), F32) / jnp.sqrt(cfg.hidden + 1.0)
    return {**params, name: {"kernel": kernel, "bias": jnp.zeros((outputs,), F32)}}


def last_token_index(segment_ids):
    """Index of the last non-padding token of each row (rows hold one example each)."""
    real = segment_ids > 0
    return jnp.maximum(real.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1), 0)


def head_outputs(params, cfg, tokens, segment_ids, *, name: str = "score_head", rng=None):
    """[batch, outputs] head values at each row's last real token (one example per row);
    `rng` (training only) feeds the body's dropout."""
    positions = jnp.maximum(jnp.cumsum(segment_ids > 0, axis=1) - 1, 0).astype(jnp.int32)
    h = llama.hidden_states(params, cfg, llama.embed_tokens(params, cfg, tokens), positions,
                            segment_ids, rng=rng)
    return head_at_last_token(params[name], h, segment_ids)


def head_at_last_token(head, h, segment_ids):
    """[batch, outputs] values of `head` ({kernel, bias}) at each row's last real token of the
    hidden states `h` [batch, s, hidden], for callers that need `h` for more than the head."""
    last = h[jnp.arange(h.shape[0]), last_token_index(segment_ids)]
    return ops.linear(last, head["kernel"], F32) + head["bias"]

"""Soft prompts: prompt tuning, P-tuning and prefix tuning.

Prompt tuning (2104.08691) and P-tuning (2103.10385) both put learned vectors where token
embeddings would be. Examples mark those slots with negative token ids (-1 is virtual token 0,
-2 is virtual token 1, ...), so packing, padding, positions and the KV cache treat them like any
token; `llama.embed_tokens` swaps in `virtual_tokens(params["prompt"])` at those slots. Prompt
tuning learns the vectors directly and puts them in front; P-tuning produces them with a prompt
encoder (an MLP, or a bidirectional LSTM + MLP) and may place them anywhere in a template.

Prefix tuning (2101.00190) learns keys and values for every layer, placed before the sequence in
each attention (the same path the KV cache uses; `llama.hidden_states` and `llama.init_cache`
read `params["prefix"]`). Training may go through a reparameterization MLP; `finalize` replaces
encoders and MLPs by the vectors they compute, which is what gets saved.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
TRAINABLE = r"^(prompt|prefix)/"


# ----------------------------------------------------------------------------- encoders


LSTM_CELLS = ("lstm_forward", "lstm_backward")


def encoder_kind(encoder_params) -> str:
    """"lstm" or "mlp": which P-tuning encoder a parameter tree belongs to."""
    return "lstm" if LSTM_CELLS[0] in encoder_params else "mlp"


class PromptEncoder(nn.Module):
    """P-tuning's encoder: (bi-LSTM +) two-layer MLP over learned input embeddings."""

    kind: str  # "mlp" or "lstm"
    hidden: int
    out_dim: int

    @nn.compact
    def __call__(self, inputs):  # [n, d] -> [n, out_dim]
        x = inputs
        if self.kind == "lstm":
            # Named cells: their parameters are what tells an LSTM encoder's tree from an MLP's.
            bi = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(self.hidden, name=LSTM_CELLS[0])),
                                  nn.RNN(nn.OptimizedLSTMCell(self.hidden, name=LSTM_CELLS[1])))
            x = bi(x[None])[0]
        elif self.kind != "mlp":
            raise ValueError(f"peft.encoder: unknown P-tuning encoder {self.kind!r}; "
                             "choose 'mlp' or 'lstm'")
        x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(self.out_dim, name="out")(x)


class PrefixMLP(nn.Module):
    """Prefix tuning's reparameterization: Dense -> tanh -> Dense to every layer's keys/values."""

    hidden: int
    out_dim: int

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(self.out_dim, name="out")(h)


# ----------------------------------------------------------------------------- init


def init_prompt_tuning(params, cfg, key, *, n: int, init: str = "vocab", text_ids=None):
    """Add `prompt/embeddings` [n, hidden]: random (the table's scale), rows of sampled
    vocabulary embeddings, or the embeddings of a text's token ids (cycled to length n)."""
    table = params["embed"]["embedding"]
    if init == "random":
        emb = jnp.std(table) * jax.random.normal(key, (n, cfg.hidden), F32)
    elif init == "vocab":
        emb = table[jax.random.randint(key, (n,), 3, cfg.vocab_size)]
    elif init == "text":
        if text_ids is None or len(text_ids) == 0:
            raise ValueError("peft.init_text: prompt tuning init 'text' needs a non-empty text")
        emb = table[jnp.asarray(np.resize(np.asarray(text_ids), n))]
    else:
        raise ValueError(f"peft.init: unknown prompt init {init!r}; choose random, vocab or text")
    return {**params, "prompt": {"embeddings": jnp.asarray(emb, F32)}}


def init_ptuning(params, cfg, key, *, n: int, encoder: str = "mlp", hidden: int = 128):
    """Add `prompt/encoder`: learned inputs [n, hidden] and the encoder producing virtual tokens."""
    k_in, k_enc = jax.random.split(key)
    inputs = 0.02 * jax.random.normal(k_in, (n, cfg.hidden), F32)
    module = PromptEncoder(encoder, hidden, cfg.hidden)
    enc_params = module.init(k_enc, inputs)["params"]
    return {**params, "prompt": {"inputs": inputs, "encoder": enc_params}}


def prefix_width(cfg) -> int:
    """Keys and values of every layer for one virtual token (PEFT's num_layers * 2 * kv dim)."""
    return cfg.layers * 2 * cfg.kv_heads * cfg.head_dim


def init_prefix(params, cfg, key, *, n: int, reparam_hidden: int = 0):
    """Add `prefix`: the [n, layers*2*kv_dim] values directly, or through an MLP when
    `reparam_hidden` > 0 (more stable training; dropped by `finalize`)."""
    k1, k2 = jax.random.split(key)
    if reparam_hidden <= 0:
        return {**params, "prefix": {"embeddings": 0.02 * jax.random.normal(
            k1, (n, prefix_width(cfg)), F32)}}
    inputs = 0.02 * jax.random.normal(k1, (n, cfg.hidden), F32)
    mlp = PrefixMLP(reparam_hidden, prefix_width(cfg)).init(k2, inputs)["params"]
    return {**params, "prefix": {"inputs": inputs, "mlp": mlp}}


# ----------------------------------------------------------------------------- values


def virtual_tokens(prompt) -> jax.Array:
    """[n, hidden] virtual token embeddings from `params["prompt"]` (direct or encoded)."""
    if "embeddings" in prompt:
        return prompt["embeddings"]
    kind = encoder_kind(prompt["encoder"])
    hidden = prompt["encoder"]["hidden"]["kernel"].shape[1]
    out_dim = prompt["inputs"].shape[1]
    return PromptEncoder(kind, hidden, out_dim).apply({"params": prompt["encoder"]},
                                                       prompt["inputs"])


def prefix_values(prefix) -> jax.Array:
    """[n, layers*2*kv_dim] prefix keys/values from `params["prefix"]` (direct or via the MLP)."""
    if "embeddings" in prefix:
        return prefix["embeddings"]
    hidden = prefix["mlp"]["hidden"]["kernel"].shape[1]
    out_dim = prefix["mlp"]["out"]["kernel"].shape[1]
    return PrefixMLP(hidden, out_dim).apply({"params": prefix["mlp"]}, prefix["inputs"])


def prefix_kv(prefix, cfg, batch: int) -> dict:
    """Per-layer keys and values [batch, kv, head_dim, n] in the attention's layout.

    The flat layout follows PEFT: per virtual token, layer i's key is block 2i and its value
    block 2i+1, each [kv_heads, head_dim]. Prefix keys carry no RoPE (as cached keys from an
    unknown position would not).
    """
    values = prefix_values(prefix)
    n = values.shape[0]
    v = values.reshape(n, cfg.layers, 2, cfg.kv_heads, cfg.head_dim).transpose(1, 2, 3, 4, 0)
    v = jnp.broadcast_to(v[:, :, None], (cfg.layers, 2, batch, cfg.kv_heads, cfg.head_dim, n))
    return {f"layers_{i}": {"k": v[i, 0], "v": v[i, 1]} for i in range(cfg.layers)}


def finalize(params):
    """Replace prompt encoders / prefix MLPs by the vectors they compute (what PEFT saves)."""
    out = dict(params)
    if "prompt" in params and "embeddings" not in params["prompt"]:
        out["prompt"] = {"embeddings": virtual_tokens(params["prompt"])}
    if "prefix" in params and "embeddings" not in params["prefix"]:
        out["prefix"] = {"embeddings": prefix_values(params["prefix"])}
    return out


# ----------------------------------------------------------------------------- data


def insert_virtual(ids: np.ndarray, loss_mask: np.ndarray, *, front: int = 0,
                   before_completion: int = 0):
    """Mark virtual-token slots in an encoded example: `front` after BOS and
    `before_completion` just before the first loss token (P-tuning templates), numbered in
    order as -1, -2, ...; the inserted slots are never in the loss."""
    first_loss = int(np.argmax(loss_mask)) if loss_mask.any() else len(ids)
    v_front = -np.arange(1, front + 1, dtype=ids.dtype)
    v_mid = -np.arange(front + 1, front + before_completion + 1, dtype=ids.dtype)
    new_ids = np.concatenate([ids[:1], v_front, ids[1:first_loss], v_mid, ids[first_loss:]])
    new_mask = np.concatenate([loss_mask[:1], np.zeros(front, bool), loss_mask[1:first_loss],
                               np.zeros(before_completion, bool), loss_mask[first_loss:]])
    return new_ids, new_mask

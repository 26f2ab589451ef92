"""Soft prompts: prompt tuning, P-tuning and prefix tuning, composed on top of the model.

Placement follows Hugging Face PEFT, so an adapter trained in one library gives the same logits
in the other.

Prompt tuning (2104.08691) and P-tuning (2103.10385) both put learned vectors where token
embeddings would be. Examples mark those slots with negative token ids (-1 is virtual token 0,
-2 is virtual token 1, ...), so packing, padding, positions and the KV cache treat them like any
token, and `model_inputs` swaps in `virtual_tokens(params["prompt"])` at those slots. Prompt
tuning learns the vectors directly and puts all of them in front of everything, BOS included
(PEFT concatenates them before the input embeddings: virtual tokens at positions 0..P-1, the
real tokens from P on). P-tuning produces them with a prompt encoder (an MLP, or a bidirectional
LSTM + MLP) and either places them in a template (some after BOS, the rest before the
completion) or prepends them like prompt tuning (PEFT's P_TUNING; `insert_virtual`).

Prefix tuning (2101.00190) learns keys and values for every layer, placed before the sequence in
each attention as P cache entries no token wrote: `model_inputs` hands them to the model's
`prefix` hook (and the sampler to `llama.init_cache`), unrotated as PEFT's `past_key_values`
are, and starts the real tokens' positions at P, as transformers derives positions from the
cache length. Training may go through a reparameterization MLP; `finalize` replaces encoders and
MLPs by the vectors they compute, which is what gets saved.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptjax.models import llama

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


# ----------------------------------------------------------------------------- model inputs


def prefix_length(params) -> int:
    """P, the number of prefix-tuning entries in `params` (0 without `params["prefix"]`)."""
    if "prefix" not in params:
        return 0
    prefix = params["prefix"]
    return int((prefix["embeddings"] if "embeddings" in prefix else prefix["inputs"]).shape[0])


def embed(params, cfg, tokens):
    """Float32 input embeddings [b, s, hidden] of `tokens`, virtual-token slots filled.

    Why here and not in the model: the slots are this module's convention (id -k is virtual
    token k-1 of `params["prompt"]`); the model only ever sees embeddings. Without a prompt,
    negative ids read as id 0.
    """
    x = llama.embed_tokens(params, cfg, jnp.maximum(tokens, 0))
    if "prompt" not in params:
        return x
    virtual = virtual_tokens(params["prompt"]).astype(F32)
    slot = jnp.clip(-tokens - 1, 0, virtual.shape[0] - 1)
    return jnp.where((tokens < 0)[..., None], virtual[slot], x)


def model_inputs(params, cfg, tokens, positions):
    """(inputs_embeds, positions, prefix) to run `tokens` through the model with the soft prompt
    or prefix that `params` carries (neither: plain embeddings, positions unchanged, None).

    Why one function: training, evaluation and sampling must place soft prompts identically;
    each calls this and passes the result to `llama.hidden_states` / `llama.init_cache` +
    `llama.decode`. With a prefix, every position shifts by P (packed segments included), since
    the P prefix entries come first, as in PEFT; `prefix` then holds per-layer keys/values
    [b, kv, head_dim, P] for the model's prefix hook.
    """
    inputs_embeds = embed(params, cfg, tokens)
    if "prefix" not in params:
        return inputs_embeds, positions, None
    prefix = prefix_kv(params["prefix"], cfg, tokens.shape[0])
    return inputs_embeds, positions + prefix_length(params), prefix


# ----------------------------------------------------------------------------- data


def insert_virtual(ids: np.ndarray, loss_mask: np.ndarray, *, prepend: int = 0,
                   after_bos: int = 0, before_completion: int = 0):
    """Mark virtual-token slots in an encoded example, numbered in order of appearance as
    -1, -2, ...; the inserted slots are never in the loss.

    Why three places: `prepend` slots go in front of everything, BOS included (where PEFT's
    prompt tuning and P_TUNING put virtual tokens); `after_bos` right after the first token and
    `before_completion` just before the first loss token are P-tuning's template placement.
    """
    n = len(ids)
    first_loss = int(np.argmax(loss_mask)) if loss_mask.any() else n
    cut = min(max(first_loss, 1), n)  # a loss on token 0 must not repeat it after the middle
    counts = (prepend, after_bos, before_completion)
    starts = np.cumsum((0,) + counts)  # -1 - starts[i] is the first id of group i
    virtual = [-np.arange(starts[i] + 1, starts[i] + counts[i] + 1, dtype=ids.dtype)
               for i in range(3)]
    new_ids = np.concatenate([virtual[0], ids[:1], virtual[1], ids[1:cut], virtual[2], ids[cut:]])
    new_mask = np.concatenate([np.zeros(prepend, bool), loss_mask[:1], np.zeros(after_bos, bool),
                               loss_mask[1:cut], np.zeros(before_completion, bool),
                               loss_mask[cut:]])
    return new_ids, new_mask

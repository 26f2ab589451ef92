"""Dense text embeddings from the model itself: masked mean of its final hidden states, optionally
through a small dual-encoder head trained with an in-batch contrastive (InfoNCE) loss.

The decoder is not trained for retrieval, so its mean-pooled states mix what a text is about with
its surface form (a question and the passage answering it share little of the latter). A linear
head on those (frozen) states, trained so each question scores its own passage above the other
passages of its batch, keeps the part that identifies the topic; it is cheap because the pooled
states are computed once and only the head trains.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptjax.data.encode import encode_prompt
from ptjax.models import llama
from ptjax.sampling import PAD_MULTIPLE

F32 = jnp.float32


def mean_pool(h, mask):
    """Masked mean [b, d] of hidden states h [b, s, d] over the positions where mask [b, s] is
    true (a row with none gives zeros)."""
    m = mask.astype(F32)[..., None]
    return jnp.sum(h.astype(F32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


STATES = ("final", "embeddings")


@functools.partial(jax.jit, static_argnames=("cfg", "states"))
def pooled_states(params, cfg, tokens, mask, states: str = "final"):
    """Mean-pooled states [b, hidden] of right-padded token rows: the final hidden states, or
    with `states="embeddings"` the model's input embeddings (a learned bag of tokens).

    Why both: which one retrieves depends on the model. The demo's byte-level model keeps a
    name in its final states (a contrastive head on them: recall@5 0.97); its BPE model does
    not (0.19), while the head on the same model's mean input embeddings reaches 1.00.
    """
    x = llama.embed_tokens(params, cfg, tokens)
    if states == "embeddings":
        return mean_pool(x, mask)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return mean_pool(llama.hidden_states(params, cfg, x, positions, mask.astype(jnp.int32)), mask)


def embed_texts(params, cfg, tokenizer, texts: list[str], *, batch_size: int = 64,
                max_len: int = 256, states: str = "final") -> np.ndarray:
    """Mean-pooled states [n, hidden] float32 of `texts`, encoded as prompts are (BOS per the
    tokenizer), cut to `max_len` tokens, right-padded to a multiple of 16 (one compile per
    length bucket) in batches of `batch_size` (the last filled with copies of the first row)."""
    if states not in STATES:
        raise ValueError(f"rag.encoder_states: {states!r} is not one of {STATES}")
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [encode_prompt(t, tokenizer)[:max_len] for t in texts[start:start + batch_size]]
        count = len(rows)
        rows += [rows[0]] * (batch_size - count)
        length = -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
        tokens = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        mask = np.zeros((batch_size, length), bool)
        for i, r in enumerate(rows):
            tokens[i, :len(r)], mask[i, :len(r)] = r, True
        out.append(np.asarray(pooled_states(params, cfg, tokens, mask, states))[:count])
    return np.concatenate(out) if out else np.zeros((0, cfg.hidden), np.float32)


def init_head(key, hidden: int, dim: int, mlp: int = 0) -> dict:
    """A projection {kernel [hidden, dim], bias [dim]} (scaled normal init); with `mlp` > 0, an
    MLP: {"hidden": {kernel [hidden, mlp], bias}, kernel [mlp, dim], bias} with a GELU between."""
    k1, k2 = jax.random.split(key)
    width = mlp or hidden
    head = {"kernel": jax.random.normal(k2, (width, dim), F32) / jnp.sqrt(width),
            "bias": jnp.zeros((dim,), F32)}
    if mlp:
        head["hidden"] = {"kernel": jax.random.normal(k1, (hidden, mlp), F32) / jnp.sqrt(hidden),
                          "bias": jnp.zeros((mlp,), F32)}
    return head


def apply_head(head: dict | None, pooled):
    """Unit-length embeddings: the pooled states through the head (when given), L2-normalized,
    so inner products are cosine similarities whatever the texts' lengths."""
    x = jnp.asarray(pooled, F32)
    if head is not None:
        if "hidden" in head:
            x = jax.nn.gelu(x @ head["hidden"]["kernel"] + head["hidden"]["bias"])
        x = x @ head["kernel"] + head["bias"]
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def info_nce(query_emb, passage_emb, temperature: float):
    """In-batch contrastive loss: mean over queries of the cross-entropy of
    softmax(q_i . p_j / temperature) over the batch's passages j against the target j = i
    (every other question's passage is a negative; DPR's in-batch negatives)."""
    logits = (query_emb @ passage_emb.T) / temperature
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.arange(logits.shape[0])).mean()


def train_head(query_pooled: np.ndarray, passage_pooled: np.ndarray, *, dim: int = 128,
               mlp: int = 0, steps: int = 300, batch_size: int = 256, lr: float = 3e-3,
               temperature: float = 0.05, seed: int = 0) -> tuple[dict, list[float]]:
    """(the head, its loss every step): InfoNCE on (question, gold passage) pooled-state pairs,
    row i of each array being one pair; the body stays frozen, so only these arrays are needed.

    A batch holds distinct passages only where the pairs do; several questions about one passage
    in a batch make each other's positives negatives (a small bias the demo accepts).
    """
    n, hidden = query_pooled.shape
    if passage_pooled.shape != query_pooled.shape:
        raise ValueError(f"{query_pooled.shape} question rows but {passage_pooled.shape} passages")
    batch_size = min(batch_size, n)
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size  # each epoch a fresh shuffle, the remainder left out
    epochs = -(-steps // per_epoch)
    batches = np.concatenate([rng.permutation(n)[:per_epoch * batch_size]
                              for _ in range(epochs)]).reshape(-1, batch_size)[:steps]
    head = init_head(jax.random.key(seed), hidden, dim, mlp)
    head, losses = _train_head(head, jnp.asarray(query_pooled, F32),
                               jnp.asarray(passage_pooled, F32), jnp.asarray(batches), lr,
                               temperature)
    return jax.device_get(head), [float(x) for x in np.asarray(losses)]


@functools.partial(jax.jit, static_argnames=("lr", "temperature"))
def _train_head(head, queries, passages, batches, lr: float, temperature: float):
    """AdamW steps over the rows of `batches` [steps, batch] as one scan (one compile, one
    call), returning the head and the loss of every step."""
    tx = optax.adamw(lr, weight_decay=0.0)

    def step(carry, idx):
        head, opt = carry
        loss, grads = jax.value_and_grad(
            lambda h: info_nce(apply_head(h, queries[idx]), apply_head(h, passages[idx]),
                               temperature))(head)
        updates, opt = tx.update(grads, opt, head)
        return (optax.apply_updates(head, updates), opt), loss

    (head, _), losses = jax.lax.scan(step, (head, tx.init(head)), batches)
    return head, losses


def fingerprint(params, cfg, head: dict | None = None, states: str = "final") -> str:
    """A short hash identifying an encoder: the model config, every leaf's path, shape and dtype,
    and the bytes of its first 4096 values (all of a small head). Why not every byte: hashing a
    7B model's 14 GB would take longer than embedding a small corpus; a fine-tuned model
    changes every leaf, so the leading values tell encoders apart."""
    h = hashlib.sha256(repr(cfg).encode())
    if states != "final":  # the final states' fingerprints stay what they were
        h.update(states.encode())
    for tree in (params, head or {}):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            a = np.asarray(jax.device_get(leaf))
            h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
            h.update(np.ascontiguousarray(a.reshape(-1)[:4096]).tobytes())
    return h.hexdigest()[:16]

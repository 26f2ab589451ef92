"""Llama-family decoder as pure functions over a nested-dict parameter pytree.

Layout of the pytree (kernels are [in, out]; Hugging Face's [out, in] is transposed on import):

    embed/embedding            [vocab, hidden]
    layers_{i}/attn_norm/scale [hidden]
    layers_{i}/attn/{q,k,v,o}/kernel (+ q,k,v bias when `qkv_bias`)
    layers_{i}/mlp_norm/scale  [hidden]
    layers_{i}/mlp/{gate,up,down}/kernel
    final_norm/scale           [hidden]
    lm_head/kernel             [hidden, vocab]   (absent when embeddings are tied)

Every matmul goes through `ops.linear`, every lookup through `ops.embed`, so weight nodes (LoRA,
NF4, ...) plug in without this file changing. Pure functions instead of `flax.linen` because linen's
`self.param` rejects a node whose leaves have other shapes than the initializer's (packed codes).

Attention masking is one rule for training, packing, padding, prefixes and the KV cache: query i
sees key j iff `slot_j <= slot_i` and the key's segment equals the query's (segment 0 is padding;
a negative key segment, used for prefixes, is visible to every non-padding query).

The model has two explicit hooks for methods that add inputs, and nothing else: input embeddings
(`hidden_states` and `decode` take embeddings, not ids) and per-layer prefix keys/values
(`hidden_states(prefix=...)`, `init_cache(prefix=...)`). Soft prompts compose on top of these
(`ptjax.peft.prompts.model_inputs`); this module imports nothing from `ptjax.peft`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ptjax import ops
from ptjax.sharding import constrain, constrain_stacked_layers
from ptjax.models.config import ModelConfig

Params = dict[str, Any]
F32 = jnp.float32


# ----------------------------------------------------------------------------- init


def init_params(cfg: ModelConfig, key) -> Params:
    """Random float32 parameters: normal(0, 0.02) matrices, residual outputs scaled by depth."""
    std = 0.02
    out_std = std / math.sqrt(2 * cfg.layers)
    keys = iter(jax.random.split(key, 8 * cfg.layers + 4))

    def normal(shape, s=std):
        return s * jax.random.normal(next(keys), shape, F32)

    d, q_dim, kv_dim = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    params: Params = {"embed": {"embedding": normal((cfg.vocab_size, d))}}
    for i in range(cfg.layers):
        attn = {
            "q": {"kernel": normal((d, q_dim))},
            "k": {"kernel": normal((d, kv_dim))},
            "v": {"kernel": normal((d, kv_dim))},
            "o": {"kernel": normal((q_dim, d), out_std)},
        }
        if cfg.qkv_bias:
            for name, width in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                attn[name]["bias"] = jnp.zeros((width,), F32)
        params[f"layers_{i}"] = {
            "attn_norm": {"scale": jnp.ones((d,), F32)},
            "attn": attn,
            "mlp_norm": {"scale": jnp.ones((d,), F32)},
            "mlp": {
                "gate": {"kernel": normal((d, cfg.mlp))},
                "up": {"kernel": normal((d, cfg.mlp))},
                "down": {"kernel": normal((cfg.mlp, d), out_std)},
            },
        }
    params["final_norm"] = {"scale": jnp.ones((d,), F32)}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": normal((d, cfg.vocab_size))}
    return params


# Logical axis names per parameter, matched by path regex (first match wins). The sharding rules
# in the config map these names to mesh axes.
PARAM_AXES = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"attn/q/kernel$", ("embed", "heads")),
    (r"attn/[kv]/kernel$", ("embed", "kv")),
    (r"attn/q/bias$", ("heads",)),
    (r"attn/[kv]/bias$", ("kv",)),
    (r"attn/o/kernel$", ("heads", "embed")),
    (r"mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/down/kernel$", ("mlp", "embed")),
    (r"norm/scale$", ("norm",)),
    (r"lm_head/kernel$", ("embed", "vocab")),
)

RESIDUAL_AXES = ("batch", "length", "embed")

# ----------------------------------------------------------------------------- pieces


def rms_norm(x, scale, eps):
    """RMSNorm in float32 (the statistics need the range), returned in float32."""
    x = x.astype(F32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * scale.astype(F32)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ()):
    """[head_dim/2] float32 rotation frequencies, with a checkpoint's RoPE scaling applied.

    Why: Llama 3.1+ and long-context fine-tunes change the frequencies (`linear` divides all of
    them by `factor`; `llama3` divides only the low ones and blends the middle band), and a model
    run with the unscaled ones computes something else without any error. Follows transformers'
    `rope_init_fn`s so logits match.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
    if not scaling:
        return inv_freq
    spec = dict(scaling)
    factor = spec["factor"]
    if spec["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: wavelengths beyond the original context are slowed by `factor`, short ones kept,
    # and the band between interpolates smoothly.
    old_len = spec["original_max_position_embeddings"]
    low, high = spec["low_freq_factor"], spec["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rotary_tables(cfg: ModelConfig, positions):
    """(cos, sin) [b, s, 1, head_dim] float32 of the rotary embedding at `positions` [b, s].

    Why computed once per forward and handed to every layer (`ops.computed_once`): computed
    inside each layer, XLA fused the cosine and sine into the consumers that broadcast them over
    heads, re-evaluating them per head in every layer's forward and backward (about 8% of a
    llama-56m train step on the 2-core CPU).
    """
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def tables(positions):
        angles = positions.astype(F32)[..., None] * inv_freq  # [b, s, d/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        return jnp.cos(angles), jnp.sin(angles)

    return ops.computed_once(tables, positions)


def rope(x, rotary):
    """Rotary embedding, rotate-half convention (Hugging Face Llama). x [b, s, h, d]; `rotary`
    is `rotary_tables` at the tokens' positions."""
    cos, sin = rotary
    xf = x.astype(F32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_slots, q_segments, k_slots, k_segments):
    """Boolean [b, s, t] mask from slot indices and segment ids (see the module docstring)."""
    causal = k_slots[:, None, :] <= q_slots[:, :, None]
    same = (k_segments[:, None, :] == q_segments[:, :, None]) | (k_segments[:, None, :] < 0)
    return causal & same & (q_segments[:, :, None] != 0)


def _project(x, p, dtype, rng=None):
    y = ops.linear(x, p["kernel"], dtype, rng)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def attention_block(p, cfg: ModelConfig, x, rotary, mask, kv: dict | None, write_slot=None,
                    rng=None, segment_ids=None):
    """Grouped-query attention. `kv` holds the layer's cache ([b, kv, d, T] keys and values)
    or a prefix; returns the block output and the updated cache for this layer. `rng` (training
    only) gives each projection its own key for weight nodes that draw randomness.
    `segment_ids` [b, s] (whole sequences without a cache or prefix: the mask is then causal
    within segments) lets a TPU run JAX's splash-attention kernel."""
    dtype = cfg.compute_dtype
    b, s, _ = x.shape
    kvh, g, hd = cfg.kv_heads, cfg.groups, cfg.head_dim
    q = _project(x, p["q"], dtype, ops.fold_key(rng, 0)).reshape(b, s, cfg.heads, hd)
    k = _project(x, p["k"], dtype, ops.fold_key(rng, 1)).reshape(b, s, kvh, hd)
    v = _project(x, p["v"], dtype, ops.fold_key(rng, 2)).reshape(b, s, kvh, hd)
    q = rope(q, rotary)
    k = rope(k, rotary)
    out = None
    if kv is None and ops.cudnn_attention_applies(dtype, hd):  # GPU: cuDNN flash attention
        out = ops.fused_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask,
                                  1.0 / math.sqrt(hd))
    elif kv is None and segment_ids is not None and ops.splash_attention_applies():  # TPU
        out = ops.splash_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                   segment_ids, 1.0 / math.sqrt(hd))
    if out is not None:  # an accelerator kernel ran (None: it refused, or none applies)
        out = out.reshape(b, s, cfg.heads * hd)
        return ops.linear(out, p["o"]["kernel"], dtype, ops.fold_key(rng, 3)), None
    k = k.transpose(0, 2, 3, 1)  # [b, kv, d, s]
    v = v.transpose(0, 2, 3, 1)
    new_kv = None
    if kv is not None and write_slot is not None:  # KV cache: write then attend over the cache
        new_kv = {name: jax.lax.dynamic_update_slice(kv[name], to_cache(new, kv[name].dtype),
                                                     (0, 0, 0, write_slot))
                  for name, new in (("k", k), ("v", v))}
        out = _attend_filled(q, new_kv, mask, write_slot + s, kvh, g, dtype)
    else:
        if kv is not None:  # prefix keys/values in front of this sequence's
            k = jnp.concatenate([kv["k"].astype(k.dtype), k], axis=-1)
            v = jnp.concatenate([kv["v"].astype(v.dtype), v], axis=-1)
        t = k.shape[-1]
        k = k.astype(dtype).reshape(b * kvh, hd, t)
        v = v.astype(dtype).reshape(b * kvh, hd, t)
        # keys are [prefix, sequence] in slot order: key j > prefix + i never reaches query i
        n_prefix = t - s
        out = jnp.concatenate([
            _attend(q[:, s0:s1], k[..., :n_prefix + s1], v[..., :n_prefix + s1],
                    mask[:, s0:s1, :n_prefix + s1], kvh, g, dtype)
            for s0, s1 in causal_query_blocks(s)], axis=1)
    return ops.linear(out, p["o"]["kernel"], dtype, ops.fold_key(rng, 3)), new_kv


def cache_blocks(slots: int) -> list[int]:
    """The key counts `_attend_filled` chooses among for a cache of `slots` slots: multiples of
    a block of at least 32 slots and an eighth of the cache, the last one the whole cache."""
    block = max(32, -(-slots // 8))
    return [min(slots, block * (j + 1)) for j in range(-(-slots // block))]


def _attend_filled(q, cache, mask, filled, kv_heads: int, groups: int, dtype):
    """Attention of q [b, s, heads, d] over the first `filled` slots of a layer's cache (a
    traced count), rounded up to one of `cache_blocks`; returns [b, s, heads*d].

    Why: slots at and after `filled` have not been written yet, and the causal mask hides them
    from every query, so attending over all of them is wasted work that grows with the cache's
    length, not the text's: a decode step of 64 prompt + 128 new tokens read and multiplied a
    192-slot cache from its first token. Written slots are always the first `filled` (left
    padding is masked, not skipped), so a `lax.switch` over a few fixed key counts keeps every
    shape static while the work follows the fill.
    """
    b = q.shape[0]
    kvh, hd, slots = cache["k"].shape[1:]
    sizes = cache_blocks(slots)

    def attend(n):
        def fn(q, kc, vc, mask):
            k = from_cache(kc[..., :n]).astype(dtype).reshape(b * kvh, hd, n)
            v = from_cache(vc[..., :n]).astype(dtype).reshape(b * kvh, hd, n)
            return _attend(q, k, v, mask[..., :n], kv_heads, groups, dtype)
        return fn

    if len(sizes) == 1:
        return attend(slots)(q, cache["k"], cache["v"], mask)
    block = sizes[0]
    which = jnp.clip((filled - 1) // block, 0, len(sizes) - 1)
    return jax.lax.switch(which, [attend(n) for n in sizes], q, cache["k"], cache["v"], mask)


CAUSAL_BLOCK = 128  # query rows per block when a sequence is long enough to split


def causal_query_blocks(s: int) -> list[tuple[int, int]]:
    """Query row ranges [s0, s1) that attend separately over keys [0, prefix + s1).

    Why: without a cache, key j (after any prefix) is masked for every query before it, so one
    [s, s] score matrix spends half its dots and softmax work on zeros. Splitting the queries
    into up to 8 blocks of at least CAUSAL_BLOCK rows skips the keys each block cannot see
    (5/8 of the work at 4 blocks, 9/16 at 8); short sequences stay one block.
    """
    n = min(8, s // CAUSAL_BLOCK)
    if n <= 1:
        return [(0, s)]
    bounds = [round(i * s / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _attend(q, k, v, mask, kv_heads: int, groups: int, dtype):
    """Attention of q [b, s, heads, d] over k, v [b*kv, d, t] -> [b, s, heads*d].

    Grouped heads that share a KV head are stacked along the query axis ([b*kv, g*s, d]), the
    layout `ops.attention` computes in.
    """
    b, s, _, hd = q.shape
    q = q.reshape(b, s, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b * kv_heads, groups * s, hd).astype(dtype)
    out = ops.attention(q, k, v, mask, 1.0 / math.sqrt(hd))
    out = out.reshape(b, kv_heads, groups, s, hd).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, s, kv_heads * groups * hd)


def mlp_block(p, cfg: ModelConfig, x, rng=None):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
    dtype = cfg.compute_dtype
    gate = ops.linear(x, p["gate"]["kernel"], dtype, ops.fold_key(rng, 0))
    up = ops.linear(x, p["up"]["kernel"], dtype, ops.fold_key(rng, 1))
    h = ops.swiglu(gate.astype(dtype), up.astype(dtype))
    return ops.linear(h, p["down"]["kernel"], dtype, ops.fold_key(rng, 2))


def decoder_layer(p, cfg: ModelConfig, x, rotary, mask, kv=None, write_slot=None, rng=None,
                  segment_ids=None):
    """Pre-norm residual layer; the residual stream stays float32. `rotary` is
    `rotary_tables(cfg, positions)` of the layer's tokens; `segment_ids` as `attention_block`."""
    dtype = cfg.compute_dtype
    h = rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps).astype(dtype)
    a, new_kv = attention_block(p["attn"], cfg, h, rotary, mask, kv, write_slot,
                                ops.fold_key(rng, 0), segment_ids)
    x = x + a.astype(F32)
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps).astype(dtype)
    x = x + mlp_block(p["mlp"], cfg, h, ops.fold_key(rng, 1)).astype(F32)
    return constrain(x, RESIDUAL_AXES), new_kv


# ----------------------------------------------------------------------------- forward


def embed_tokens(params: Params, cfg: ModelConfig, tokens):
    """Token ids [b, s] (all >= 0) -> float32 input embeddings [b, s, hidden].

    A plain table lookup: soft-prompt slots (negative ids) are resolved by the method that owns
    them (`ptjax.peft.prompts.model_inputs`), which then hands embeddings to `hidden_states`.
    """
    table = params["embed"]["embedding"]
    if not ops.is_weight_node(table):
        # gathered over FSDP first, as a layer's weight is: a lookup from a table split over
        # `embed` makes XLA's partitioner replicate the rows it took and split them again
        table = constrain(table, ("vocab", None))
    return ops.embed(tokens, table, F32)


def hidden_states(params: Params, cfg: ModelConfig, inputs_embeds, positions, segment_ids,
                  prefix: dict | None = None, rng=None):
    """Final normed hidden states [b, s, hidden] of a whole sequence (training and scoring).

    `prefix` (prefix tuning) maps `layers_i` to {"k", "v"} of shape [b, kv, head_dim, P]; those
    entries sit before the sequence, are used as given (no RoPE, like cached keys) and every
    non-padding token sees them. `positions` are used as given too: a caller with a prefix
    passes positions that start after it. `rng` is the train step's key for weights that draw
    randomness (LoRA dropout); None is deterministic.

    Layers run as one `lax.scan` over their parameters stacked inside the step (`stack`), so
    the program holds one layer's code whatever the depth: the full bf16 step of llama-1b's
    width (batch 1 x 2048, `bench --plan --layers=N`) compiles in 10.3 s at 16 layers and 23 s
    at 80 on the 2-core CPU, against 17.5 s and 107 s unrolled; what still grows is per-layer
    leaf work outside the scan (the optimizer update, gradient norm, stacking). The price is
    memory: the stacked copy of the layers (and, for trainable layers, their stacked
    gradients before they are split per layer) lives in the step's scratch (README, "Deep
    models"). The stored tree, and everything that reads it (selectors, checkpoints, HF/PEFT
    files), keeps its per-layer paths; the stacked copy exists only inside the step. Layers
    whose parameters differ in structure (an adapter on some layers only), or
    `cfg.scan_layers=False`, run unrolled.
    """
    b, s, _ = inputs_embeds.shape
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_slots, k_segments = slots, segment_ids
    if prefix is not None:
        n_prefix = next(iter(prefix.values()))["k"].shape[-1]
        k_slots = jnp.concatenate([jnp.full((b, n_prefix), -1, jnp.int32), slots], axis=1)
        k_segments = jnp.concatenate([jnp.full((b, n_prefix), -1, jnp.int32), segment_ids], axis=1)
    mask = attention_mask(slots, segment_ids, k_slots, k_segments)

    x = constrain(inputs_embeds.astype(F32), RESIDUAL_AXES)
    rotary = rotary_tables(cfg, positions)

    def layer(p, x, kv, index):
        return decoder_layer(p, cfg, x, rotary, mask, kv, None, ops.fold_key(rng, index),
                             None if prefix is not None else segment_ids)[0]

    if cfg.remat == "full":
        layer = jax.checkpoint(layer)
    per_layer = [params[f"layers_{i}"] for i in range(cfg.layers)]
    kvs = [None if prefix is None else prefix[f"layers_{i}"] for i in range(cfg.layers)]
    if not cfg.scan_layers or not same_layout(per_layer):  # asked, or layers differ: unrolled
        for i, (p, kv) in enumerate(zip(per_layer, kvs)):
            x = layer(p, x, kv, i)
    else:
        def scan_step(x, xs):
            p, kv, index = xs
            return layer(p, x, kv, index), None

        stacked = constrain_stacked_layers(stack(per_layer))
        x, _ = jax.lax.scan(scan_step, x, (stacked, None if prefix is None else stack(kvs),
                                           jnp.arange(cfg.layers)))
    return rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)


def same_layout(trees: list) -> bool:
    """True when every tree has the same structure (static node fields included), leaf shapes
    and dtypes, so they can be stacked and scanned over."""
    def layout(t):
        return jax.tree.structure(t), [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(t)]

    first = layout(trees[0])
    return all(layout(t) == first for t in trees[1:])


def stack(trees: list):
    """The trees' leaves stacked along a new leading (layer) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def output_head(params: Params, cfg: ModelConfig):
    """The output projection and whether it is laid out [vocab, hidden] (tied embeddings)."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"], True
    return params["lm_head"]["kernel"], False


def logits_from_hidden(params: Params, cfg: ModelConfig, h):
    """Float32 logits [..., vocab] for the given hidden states."""
    w, vocab_major = output_head(params, cfg)
    dtype = cfg.compute_dtype
    if vocab_major:
        return ops.dense_vocab_major(h, ops.materialize(w), dtype)
    return ops.linear(h.astype(dtype), w, dtype).astype(F32)


def forward(params: Params, cfg: ModelConfig, tokens, positions=None, segment_ids=None):
    """Logits [b, s, vocab] of a full (uncached) forward pass; the reference the cache must match."""
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    h = hidden_states(params, cfg, embed_tokens(params, cfg, tokens), positions, segment_ids)
    return logits_from_hidden(params, cfg, h)


# ----------------------------------------------------------------------------- KV cache


def cache_storage_dtype(dtype):
    """The dtype a cache of `dtype` keys/values is stored in: bfloat16 as its uint16 bits.

    Why: XLA's CPU backend writes one new slot into a bfloat16 buffer by converting the whole
    buffer to float32 and back (measured: 1-2 ms per layer and step at batch 16, a third of a
    llama-56m decode step); into a uint16 buffer the same write is in place.
    """
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def to_cache(x, storage_dtype):
    """`x` as cache entries of `storage_dtype` (see `cache_storage_dtype`)."""
    if storage_dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage_dtype)


def from_cache(c):
    """Cache entries as values (uint16 entries are bfloat16 bits)."""
    return jax.lax.bitcast_convert_type(c, jnp.bfloat16) if c.dtype == jnp.uint16 else c


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, prefix: dict | None = None
               ) -> dict:
    """A cache for `max_len` tokens: per-layer keys/values [b, kv, head_dim, slots] of `dtype`
    (default the compute dtype; bfloat16 is stored as uint16, see `cache_storage_dtype`), slot
    segments and the fill index.

    Why a `prefix` argument: prefix tuning's keys/values are cache entries that no token wrote,
    so they are placed here, in the first P slots (visible to every real token, segment -1), and
    `max_len` slots follow; decoding then needs nothing else. `prefix` maps `layers_i` to
    {"k", "v"} of shape [batch, kv, head_dim, P].
    """
    storage = cache_storage_dtype(dtype or cfg.compute_dtype)
    n_prefix = 0 if prefix is None else prefix["layers_0"]["k"].shape[-1]
    shape = (batch, cfg.kv_heads, cfg.head_dim, n_prefix + max_len)
    cache = {}
    for i in range(cfg.layers):
        layer = {}
        for name in ("k", "v"):
            c = jnp.zeros(shape, storage)
            if prefix is not None:
                c = c.at[..., :n_prefix].set(to_cache(prefix[f"layers_{i}"][name], storage))
            layer[name] = c
        cache[f"layers_{i}"] = layer
    cache["segments"] = jnp.zeros((batch, n_prefix + max_len), jnp.int32).at[:, :n_prefix].set(-1)
    cache["index"] = jnp.asarray(n_prefix, jnp.int32)
    return cache


def decode(params: Params, cfg: ModelConfig, inputs_embeds, positions, segment_ids, cache: dict):
    """Run `s` new tokens through the model against the cache; returns (hidden, new cache).

    The new tokens occupy cache slots index..index+s-1. `segment_ids` is 1 for real tokens and 0
    for left padding, so padded slots are never attended to. Prefilled entries with a negative
    segment (a prefix) are visible to all real tokens.
    """
    b, s, _ = inputs_embeds.shape
    index = cache["index"]
    max_len = cache["segments"].shape[1]
    segments = jax.lax.dynamic_update_slice(cache["segments"], segment_ids.astype(jnp.int32),
                                            (0, index))
    q_slots = index + jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
    mask = attention_mask(q_slots, segment_ids, k_slots, segments)
    x = inputs_embeds.astype(F32)
    new_cache = {"segments": segments, "index": index + s}
    rotary = rotary_tables(cfg, positions)
    for i in range(cfg.layers):
        name = f"layers_{i}"
        x, new_cache[name] = decoder_layer(params[name], cfg, x, rotary, mask, cache[name], index)
    return rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps), new_cache

"""Model behaviour the numpy reference does not cover: the KV cache, padding, remat."""

import ast
import dataclasses

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ptjax import ops, tree
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.nodes import WeightNode

CFG = preset("tiny")
PARAMS = llama.init_params(CFG, jax.random.key(0))
forward = jax.jit(llama.forward, static_argnums=1)
decode = jax.jit(llama.decode, static_argnums=1)
embed_tokens = jax.jit(llama.embed_tokens, static_argnums=1)
logits_from_hidden = jax.jit(llama.logits_from_hidden, static_argnums=1)


def _incremental_logits(params, cfg, tokens, mask, chunks):
    """Feed left-padded `tokens` through the cache in the given chunk sizes."""
    b, s = tokens.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = llama.init_cache(cfg, b, s + 3)
    out, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        h, cache = decode(params, cfg, embed_tokens(params, cfg, tokens[:, sl]),
                                positions[:, sl], mask[:, sl].astype(jnp.int32), cache)
        out.append(logits_from_hidden(params, cfg, h))
        start += n
    return jnp.concatenate(out, axis=1)


def test_cached_decoding_equals_full_forward():
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 3, CFG.vocab_size)
    mask = jnp.ones((2, 9), bool)
    full = forward(PARAMS, CFG, tokens)
    inc = _incremental_logits(PARAMS, CFG, tokens, mask, [4, 1, 1, 3])
    chex.assert_shape(inc, (2, 9, CFG.vocab_size))
    np.testing.assert_allclose(inc, full, rtol=1e-5, atol=1e-5)
    # Not vacuous: a different prefix changes the later logits.
    other = forward(PARAMS, CFG, tokens.at[:, 0].set(5))
    assert np.abs(np.asarray(other[:, -1] - full[:, -1])).max() > 1e-3


def test_bfloat16_cache_holds_bits_and_decodes_like_the_full_forward():
    """A bf16 model's cache is uint16 (bf16 bits, written in place); decoding through it gives
    the bf16 full forward's logits (the same bf16 keys and values, summed in another order)."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 3, CFG.vocab_size)
    cache = llama.init_cache(cfg, 2, 12)
    chex.assert_type([cache["layers_0"]["k"], cache["layers_0"]["v"]], jnp.uint16)
    full = forward(PARAMS, cfg, tokens)
    inc = _incremental_logits(PARAMS, cfg, tokens, jnp.ones((2, 9), bool), [4, 1, 1, 3])
    scale = float(np.abs(np.asarray(full)).max())
    np.testing.assert_allclose(inc, full, rtol=0, atol=0.02 * scale)
    # The bf16 config really computes in bf16: its logits are not the float32 model's.
    assert np.abs(np.asarray(forward(PARAMS, CFG, tokens)) - np.asarray(full)).max() > 1e-4


def test_left_padded_rows_equal_unpadded_rows():
    seqs = [np.array([5, 9, 14, 20, 7, 3]), np.array([11, 4, 8])]
    width = 6
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):] = s
        mask[i, width - len(s):] = True
    inc = _incremental_logits(PARAMS, CFG, jnp.asarray(tokens), jnp.asarray(mask), [width])
    for i, s in enumerate(seqs):
        alone = forward(PARAMS, CFG, jnp.asarray(s)[None])[0]
        np.testing.assert_allclose(inc[i, width - len(s):], alone, rtol=1e-5, atol=1e-5)


def test_remat_changes_memory_not_gradients():
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 3, CFG.vocab_size)

    def loss(params, cfg):
        return jnp.mean(llama.forward(params, cfg, tokens) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1 = grad(PARAMS, CFG)
    g2 = grad(PARAMS, dataclasses.replace(CFG, remat="full"))
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-7)
    # Remat happens exactly when asked for (the setting arrives as a run-time string), once in
    # the body of the scan over layers.
    for setting, remats in (("none", 0), ("".join(["fu", "ll"]), 1)):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
            PARAMS, dataclasses.replace(CFG, remat=setting)))
        assert jaxpr.count("remat") >= remats, setting
        assert "scan" in jaxpr
        if not remats:
            assert "remat" not in jaxpr


def _imported_modules(path):
    """Every module an `import` or `from ... import` statement in the file at `path` names."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_model_imports_nothing_from_methods():
    """Principle 6: soft prompts, quantization and pruning compose on top of the model through
    its explicit hooks (input embeddings, prefix keys/values); the model never imports them."""
    names = _imported_modules(llama.__file__)
    assert "ptjax.ops" in names and "ptjax.models.config.ModelConfig" in names  # parser sees imports
    for method in ("ptjax.peft", "ptjax.quant", "ptjax.prune"):
        assert not [n for n in names if n == method or n.startswith(method + ".")], method


def test_embed_tokens_is_a_plain_lookup():
    """Soft prompts are not the model's business: `params["prompt"]` does not change embeddings."""
    rows = np.arange(3 * CFG.hidden, dtype=np.float32).reshape(3, CFG.hidden)
    params = {**PARAMS, "prompt": {"embeddings": jnp.asarray(rows)}}
    tokens = jnp.asarray([[7, 5, 0, 9]])
    np.testing.assert_array_equal(llama.embed_tokens(params, CFG, tokens),
                                  np.asarray(PARAMS["embed"]["embedding"])[[[7, 5, 0, 9]]])


def test_init_shapes_and_float32_master_weights():
    chex.assert_shape(PARAMS["embed"]["embedding"], (CFG.vocab_size, CFG.hidden))
    chex.assert_shape(PARAMS["layers_1"]["attn"]["k"]["kernel"],
                      (CFG.hidden, CFG.kv_heads * CFG.head_dim))
    chex.assert_shape(PARAMS["lm_head"]["kernel"], (CFG.hidden, CFG.vocab_size))
    chex.assert_trees_all_equal_dtypes(PARAMS, jax.tree.map(lambda x: x.astype(jnp.float32), PARAMS))
    # normal(0, 0.02), with the projections that feed the residual stream scaled by 1/sqrt(2L).
    big = llama.init_params(dataclasses.replace(CFG, hidden=64, mlp=256), jax.random.key(1))
    out_std = 0.02 / np.sqrt(2 * CFG.layers)
    for path, want in (("attn/q", 0.02), ("mlp/up", 0.02), ("attn/o", out_std),
                       ("mlp/down", out_std)):
        group, name = path.split("/")
        got = float(np.std(big["layers_0"][group][name]["kernel"]))
        assert abs(got / want - 1) < 0.05, (path, got, want)


@flax.struct.dataclass
class KeyProbe(WeightNode):
    """Stands for a weight and reports (its path, the key data it was handed) to `SEEN`."""

    base: object
    path: str = flax.struct.field(pytree_node=False, default="")

    def linear(self, x, dtype, rng=None):
        if rng is not None:
            jax.debug.callback(lambda k, p=self.path: SEEN.append((p, tuple(np.asarray(k)))),
                               jax.random.key_data(rng))
        return ops.linear(x, self.base, dtype)

    def part_axes(self, axes):
        return {"base": axes}


SEEN = []


def test_every_projection_draws_from_its_own_key():
    """Training-time randomness (LoRA dropout) must not repeat across projections or layers:
    each of the 7 projections of each layer gets a distinct key, none equal to the step's."""
    probed = tree.map_with_path(
        lambda p, w: KeyProbe(base=w, path=p) if p.endswith("kernel") and "layers_" in p else w,
        PARAMS)
    tokens = jnp.ones((1, 4), jnp.int32)
    positions = jnp.arange(4)[None]
    rng = jax.random.key(3)
    SEEN.clear()
    h = llama.hidden_states(probed, CFG, llama.embed_tokens(probed, CFG, tokens), positions,
                            jnp.ones((1, 4), jnp.int32), rng=rng)
    jax.block_until_ready(h)
    jax.effects_barrier()
    paths = [p for p, _ in SEEN]
    assert len(paths) == 7 * CFG.layers == len(set(paths))
    keys = {k for _, k in SEEN} | {tuple(np.asarray(jax.random.key_data(rng)))}
    assert len(keys) == 7 * CFG.layers + 1
    SEEN.clear()
    llama.hidden_states(probed, CFG, llama.embed_tokens(probed, CFG, tokens), positions,
                        jnp.ones((1, 4), jnp.int32))
    jax.effects_barrier()
    assert SEEN == []  # no key, no randomness: evaluation is deterministic

"""PEFT methods as pytree transforms: identity at init, merge == unmerged, only adapters train,
soft prompts placed as PEFT places them (checked against a numpy reference), cached generation
with soft prompts equals the uncached forward."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptjax import nodes
from ptjax import peft, sharding
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.peft import adapters, ia3, lora, prompts
from ptjax.train import sft
from ptjax.train.losses import next_token_nll
from ptjax.train import state as state_lib
from ptjax.train.config import base_config
from ptjax import data as D

CFG = preset("tiny")
BASE = llama.init_params(CFG, jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 3, CFG.vocab_size)
forward = jax.jit(llama.forward, static_argnums=1)


def peft_cfg(method, **kw):
    c = base_config().peft
    c.method = method
    c.rank, c.alpha, c.num_virtual, c.bottleneck, c.encoder_hidden = 4, 8.0, 4, 8, 16
    for k, v in kw.items():
        c[k] = v
    return c


def method_batches(cfg, n, batch_size=8, seq_len=64, seed=0):
    tok = D.ByteTokenizer()
    examples = [peft.add_virtual_slots(D.encode_sft(r, tok, seq_len), cfg)
                for r in D.instruction_records(300, seed)]
    it = D.PackedBatches(examples, seq_len, batch_size, seed=seed)
    return [next(it) for _ in range(n)]


def perturb(params, pattern, key=7, scale=0.05):
    """Random values on the selected leaves, so adapters do something."""
    mask = ptree.select(params, pattern)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    flat_mask = jax.tree.leaves(mask)
    out = [x + scale * jax.random.normal(k, x.shape) if m else x
           for x, k, m in zip(leaves, keys, flat_mask)]
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter"])
def test_fresh_adapters_leave_logits_unchanged(method):
    params, _ = peft.apply(BASE, CFG, peft_cfg(method), jax.random.key(2))
    assert nodes.nodes_of(params)
    np.testing.assert_allclose(forward(params, CFG, TOKENS), forward(BASE, CFG, TOKENS),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,pattern", [("lora", lora.TRAINABLE), ("dora", lora.TRAINABLE),
                                            ("ia3", ia3.TRAINABLE)])
def test_merged_forward_equals_unmerged(method, pattern):
    params, _ = peft.apply(BASE, CFG, peft_cfg(method), jax.random.key(2))
    params = perturb(params, pattern)
    merged = peft.finalize(params, peft_cfg(method))
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, BASE)  # costs exactly the base
    unmerged_logits = forward(params, CFG, TOKENS)
    assert np.abs(np.asarray(unmerged_logits - forward(BASE, CFG, TOKENS))).max() > 1e-3
    np.testing.assert_allclose(forward(merged, CFG, TOKENS), unmerged_logits, rtol=1e-5, atol=1e-5)


def test_lora_merge_and_unmerge_against_numpy():
    """merge gives W + s A B computed in float64 numpy; unmerge gives back the original base
    (compared with the base itself, so an error shared by merge and unmerge cannot cancel)."""
    params = perturb(lora.inject(BASE, jax.random.key(2), rank=4, alpha=6.0), lora.TRAINABLE)
    merged = dict(ptree.flatten_with_paths(nodes.merge(params)))
    base = dict(ptree.flatten_with_paths(BASE))
    lora_nodes = [(p, n) for p, n in ptree.flatten_with_paths(params, nodes_as_leaves=True)
             if isinstance(n, lora.LoRA)]
    assert len(lora_nodes) == 7 * CFG.layers
    for path, node in lora_nodes:
        want = (np.asarray(node.base, np.float64) +
                1.5 * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64))
        np.testing.assert_allclose(merged[path], want, rtol=1e-5, atol=1e-6, err_msg=path)
    back = lora.unmerge(nodes.merge(params), params)
    for path, node in ptree.flatten_with_paths(back, nodes_as_leaves=True):
        if isinstance(node, lora.LoRA):
            np.testing.assert_allclose(node.base, base[path], atol=1e-6, err_msg=path)
            assert node.scale == 1.5


def test_lora_delta_matches_numpy_reference():
    node = perturb(lora.inject(BASE, jax.random.key(2), rank=4, alpha=8.0, rslora=True),
                   lora.TRAINABLE)["layers_0"]["attn"]["q"]["kernel"]
    x = np.asarray(jax.random.normal(jax.random.key(3), (5, CFG.hidden)), np.float64)
    w, a, b = (np.asarray(v, np.float64) for v in (node.base, node.a, node.b))
    want = x @ w + (8.0 / np.sqrt(4)) * (x @ a) @ b
    np.testing.assert_allclose(node.linear(jnp.asarray(x, jnp.float32), jnp.float32), want,
                               rtol=1e-5, atol=1e-5)


def _numpy_dora(x, w, a, b, scale, m, cot):
    """DoRA in float64 from the paper / PEFT: V = W + s A B, n = ||V|| per output channel
    (detached), y = x V * m / n; and the gradients of sum(y * cot) for A, B and m."""
    v = w + scale * a @ b
    n = np.sqrt((v * v).sum(0))
    y = (x @ v) * (m / n)
    g_out = cot * (m / n)  # through x V only: n is a constant
    return y, {"a": scale * x.T @ g_out @ b.T, "b": scale * (x @ a).T @ g_out,
               "magnitude": ((x @ v) * cot).sum(0) / n}


def test_dora_forward_and_gradients_match_numpy():
    node = perturb(lora.inject(BASE, jax.random.key(2), rank=4, alpha=8.0, dora=True),
                   lora.TRAINABLE, scale=0.3)["layers_0"]["mlp"]["up"]["kernel"]
    rng = np.random.default_rng(4)
    x, cot = rng.standard_normal((5, CFG.hidden)), rng.standard_normal((5, CFG.mlp))
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    want_y, want_g = _numpy_dora(x, f64(node.base), f64(node.a), f64(node.b), 2.0,
                                 f64(node.magnitude), cot)
    xj, cj = jnp.asarray(x, jnp.float32), jnp.asarray(cot, jnp.float32)

    def loss(parts):
        return jnp.sum(node.replace(**parts).linear(xj, jnp.float32) * cj)

    parts = {"a": node.a, "b": node.b, "magnitude": node.magnitude}
    np.testing.assert_allclose(node.linear(xj, jnp.float32), want_y, rtol=1e-5, atol=1e-5)
    got = jax.grad(loss)(parts)
    for name in parts:
        np.testing.assert_allclose(got[name], want_g[name], rtol=1e-4,
                                   atol=1e-5 * np.abs(want_g[name]).max(), err_msg=name)
    np.testing.assert_allclose(x @ f64(node.materialize()), want_y, rtol=1e-5, atol=1e-5)


def _identity_lora(n, dropout):
    """A LoRA node whose output is exactly its dropped-out input: base 0, A = B = I, scale 1."""
    eye = jnp.eye(n, dtype=jnp.float32)
    return lora.LoRA(base=jnp.zeros((n, n)), a=eye, b=eye, scale=1.0, dropout=dropout)


def test_lora_dropout_keeps_with_probability_and_rescales():
    rate, n = 0.3, 64
    node = _identity_lora(n, rate)
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (256, n)), jnp.float32)
    np.testing.assert_array_equal(node.linear(x, jnp.float32), x)  # no key: no dropout
    y = np.asarray(node.linear(x, jnp.float32, jax.random.key(5)))
    dropped = y == 0
    np.testing.assert_allclose(y[~dropped], np.asarray(x)[~dropped] / (1 - rate), rtol=1e-6)
    # 16384 Bernoulli draws: the dropped fraction is within 5 standard deviations of the rate.
    assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / dropped.size)
    other = np.asarray(node.linear(x, jnp.float32, jax.random.key(6)))
    assert ((other == 0) != dropped).mean() > 0.2  # another key, other masks


@pytest.mark.slow  # CI keeps tests/test_train.py's accumulation == one big batch
def test_accumulated_microbatches_draw_their_own_dropout_masks():
    """With grad_accum=2 over two copies of one microbatch, the step's gradient is the sum of the
    microbatch gradients under keys fold_in(rng, 0) and fold_in(rng, 1), which differ."""
    params = perturb(lora.inject(BASE, jax.random.key(2), rank=4, dropout=0.5), lora.TRAINABLE)
    mask = ptree.select(params, lora.TRAINABLE)
    tx = optax.sgd(1.0)
    state = state_lib.create(params, mask, tx, seed=0)
    micro = method_batches(peft_cfg("lora"), 1, batch_size=2, seq_len=32)[0]
    batch = {k: np.concatenate([v, v]) for k, v in micro.items()}
    rng = jax.random.key(11)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx, grad_accum=2))
    new, _ = step(state, batch, rng)
    applied = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), new.trainable,
                           state.trainable)

    @jax.jit
    def grad_sum(key):
        return jax.grad(lambda tr: next_token_nll(ptree.merge(tr, state.frozen), CFG, micro,
                                                  rng=key)[0])(state.trainable)

    g0, g1 = grad_sum(jax.random.fold_in(rng, 0)), grad_sum(jax.random.fold_in(rng, 1))
    tokens = 2 * micro["loss_mask"].sum()
    want = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / tokens, g0, g1)
    # atol: float32 rounding of entries where the two microbatches' gradients nearly cancel, one
    # millionth of the largest entry (~0.2); using one key twice moves entries by ~1e-4.
    chex.assert_trees_all_close(applied, want, rtol=1e-4, atol=1e-6)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert diff > 1e-3  # the two microbatches really used different masks
    # Without accumulation the one microbatch is microbatch 0: the same masks as above.
    single = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))
    new, _ = single(state, micro, rng)
    applied = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), new.trainable,
                           state.trainable)
    want = jax.tree.map(lambda a: np.asarray(a) / micro["loss_mask"].sum(), g0)
    chex.assert_trees_all_close(applied, want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def warm_base():
    """The tiny model after a little full fine-tuning, so adapters start from a useful base."""
    tx = optax.adam(1e-2)
    state = state_lib.create(BASE, ptree.select(BASE, ".*"), tx, seed=0)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))
    for b in method_batches(peft_cfg("full"), 30):
        state, _ = step(state, b, None)
    return state.params


# Full fine-tuning trains everything in every trainer test; CI runs the PEFT methods here.
# DoRA is LoRA plus a magnitude (its forward and gradients against numpy stay in CI).
@pytest.mark.parametrize("method", [pytest.param("full", marks=pytest.mark.slow), "lora",
                                    pytest.param("dora", marks=pytest.mark.slow),
                                    "ia3", "adapter", "prompt", "ptuning", "prefix"])
def test_method_trains_only_its_parameters_and_lowers_loss(method, warm_base):
    cfg = peft_cfg(method, freeze="^(embed|layers_0)/" if method == "full" else "",
                   num_virtual=8, reparam_hidden=32 if method == "prefix" else 0)
    params, trainable = peft.apply(warm_base, CFG, cfg, jax.random.key(2))
    tx = optax.adam({"prompt": 3e-2, "ptuning": 3e-2, "prefix": 3e-2}.get(method, 1e-2))
    state = state_lib.create(params, ptree.select(params, trainable), tx, seed=0)
    n_train = ptree.count(state.trainable)
    assert 0 < n_train < ptree.count(params)
    assert ptree.count(state.opt_state) == 2 * n_train + 1  # Adam moments only for trainables
    step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))
    frozen_before = state.frozen
    batches = method_batches(cfg, 8)
    eval_fn = jax.jit(functools.partial(sft.eval_step, model_cfg=CFG))

    def task_loss(params):
        return sum(float(eval_fn(params, b)["nll_sum"]) for b in batches)

    start = task_loss(state.params)
    for _ in range(3):
        for b in batches:
            state, _ = step(state, b, jax.random.key(0))
    end = task_loss(state.params)
    assert end < 0.998 * start, (start, end)  # deterministic: same batches, same params
    chex.assert_trees_all_equal(state.frozen, frozen_before)


def _soft_logits(params, cfg, tokens, positions, segment_ids):
    """Logits of `tokens` with the soft prompt / prefix in `params`, composed as the train step
    and the sampler compose them (`prompts.model_inputs` feeding the model's hooks)."""
    inputs_embeds, positions, prefix = prompts.model_inputs(params, cfg, tokens, positions)
    h = llama.hidden_states(params, cfg, inputs_embeds, positions, segment_ids, prefix=prefix)
    return llama.logits_from_hidden(params, cfg, h)


_soft_logits_jit = jax.jit(_soft_logits, static_argnums=1)


def soft_logits(params, tokens, positions=None, segment_ids=None):
    tokens = jnp.asarray(tokens)
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    return _soft_logits_jit(params, CFG, tokens, jnp.asarray(positions), jnp.asarray(segment_ids))


def numpy_logits(params, embeds, positions, prefix_values=None):
    """float64 logits [s, vocab] of one sequence from its input embeddings [s, hidden], written
    from the Hugging Face Llama equations without `llama.py`: per-head attention with KV heads
    repeated, rotate-half RoPE at `positions`, and, with `prefix_values` [P, layers*2*kv*hd]
    (PEFT's layout: per token, layer i's key is block 2i, its value block 2i+1), P unrotated
    key/value entries in front that every token attends to."""
    c, f = CFG, (lambda a: np.asarray(a, np.float64))
    x, positions = f(embeds), f(positions)
    s, hd = x.shape[0], c.head_dim

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + c.norm_eps) * f(w)

    def rope(v):  # [s, heads, hd]
        ang = positions[:, None] * c.rope_theta ** (-np.arange(0, hd, 2) / hd)
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        lo, hi = v[..., :hd // 2], v[..., hd // 2:]
        return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], -1)

    n_prefix = 0 if prefix_values is None else len(prefix_values)
    if n_prefix:
        pv = f(prefix_values).reshape(n_prefix, c.layers, 2, c.kv_heads, hd)
    allowed = np.concatenate([np.ones((s, n_prefix), bool), np.tril(np.ones((s, s), bool))], 1)
    for i in range(c.layers):
        p = params[f"layers_{i}"]
        h = norm(x, p["attn_norm"]["scale"])
        q = rope((h @ f(p["attn"]["q"]["kernel"])).reshape(s, c.heads, hd))
        k = rope((h @ f(p["attn"]["k"]["kernel"])).reshape(s, c.kv_heads, hd))
        v = (h @ f(p["attn"]["v"]["kernel"])).reshape(s, c.kv_heads, hd)
        if n_prefix:
            k, v = np.concatenate([pv[:, i, 0], k]), np.concatenate([pv[:, i, 1], v])
        k, v = np.repeat(k, c.groups, axis=1), np.repeat(v, c.groups, axis=1)
        scores = np.where(allowed, np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(s, -1) @ f(p["attn"]["o"]["kernel"])
        h = norm(x, p["mlp_norm"]["scale"])
        gate = h @ f(p["mlp"]["gate"]["kernel"])
        x = x + (gate / (1 + np.exp(-gate)) * (h @ f(p["mlp"]["up"]["kernel"]))) @ f(
            p["mlp"]["down"]["kernel"])
    return norm(x, params["final_norm"]["scale"]) @ f(params["lm_head"]["kernel"])


def with_soft_prompt(method, seed=3, **kw):
    """BASE with a perturbed (so it matters) soft prompt or prefix of 4 virtual tokens."""
    cfg = peft_cfg(method, **kw)
    params, _ = peft.apply(BASE, CFG, cfg, jax.random.key(seed))
    return cfg, perturb(params, prompts.TRAINABLE, key=seed, scale=0.5)


def test_prompt_tuning_prepends_virtual_tokens_before_bos():
    """PEFT's placement: [virtual 0..P-1, BOS, text...] at positions 0..P+n-1."""
    cfg, params = with_soft_prompt("prompt")
    ids = np.asarray([1, 40, 41, 42, 43, 44])
    slotted, mask = peft.add_virtual_slots((ids, np.asarray([0, 0, 0, 1, 1, 1], bool)), cfg)
    np.testing.assert_array_equal(slotted, [-1, -2, -3, -4, 1, 40, 41, 42, 43, 44])
    np.testing.assert_array_equal(mask, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    got = np.asarray(soft_logits(params, slotted[None]))[0]
    virtual = np.asarray(params["prompt"]["embeddings"])
    embeds = np.concatenate([virtual, np.asarray(BASE["embed"]["embedding"])[ids]])
    n = len(embeds)
    hand = llama.logits_from_hidden(BASE, CFG, llama.hidden_states(
        BASE, CFG, jnp.asarray(embeds)[None], jnp.arange(n)[None], jnp.ones((1, n), jnp.int32)))
    np.testing.assert_allclose(got, hand[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, numpy_logits(BASE, embeds, np.arange(n)), rtol=1e-4,
                               atol=1e-4)
    # The prompt matters, and where it sits matters (after BOS is another function).
    after_bos = np.concatenate([ids[:1], slotted[:4], ids[1:]])
    assert np.abs(np.asarray(soft_logits(params, after_bos[None]))[0, 5:] - got[5:]).max() > 1e-3


@pytest.mark.parametrize("causal_block", [0, 3], indirect=True)
def test_prefix_tuning_matches_numpy_attention_with_positions_after_the_prefix(causal_block):
    """Prefix entries are P unrotated keys/values in front; the real tokens' queries and keys
    sit at positions P.. (transformers derives positions from the cache length)."""
    if causal_block:
        assert llama.causal_query_blocks(7) == [(0, 4), (4, 7)]
    _, params = with_soft_prompt("prefix", reparam_hidden=16)
    values = np.asarray(prompts.prefix_values(params["prefix"]))
    ids = np.asarray([1, 40, 41, 42, 43, 44, 45])
    got = np.asarray(soft_logits(params, ids[None]))[0]
    embeds = np.asarray(BASE["embed"]["embedding"])[ids]
    want = numpy_logits(BASE, embeds, 4 + np.arange(len(ids)), values)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Positions from 0 (the old placement) are another function.
    assert np.abs(numpy_logits(BASE, embeds, np.arange(len(ids)), values) - want).max() > 1e-3


def test_packed_and_padded_prefix_rows_equal_examples_alone_and_the_loss_uses_them():
    """Every packed segment sees the prefix and starts at position P, in the train step's loss
    as in a plain forward; padding changes nothing."""
    cfg, params = with_soft_prompt("prefix")
    a = (np.asarray([1, 30, 31, 32, 33]), np.asarray([0, 0, 1, 1, 1], bool))
    b = (np.asarray([1, 50, 51]), np.asarray([0, 1, 1], bool))
    rows = D.pack([a, b], 16)
    packed = np.asarray(soft_logits(params, rows["inputs"], rows["positions"],
                                    rows["segment_ids"]))[0]
    values = np.asarray(prompts.prefix_values(params["prefix"]))
    table = np.asarray(BASE["embed"]["embedding"])
    nll, weight = 0.0, 0.0
    for seg, (ids, _) in enumerate([a, b], start=1):
        where = np.nonzero(rows["segment_ids"][0] == seg)[0]
        alone = numpy_logits(BASE, table[ids], 4 + np.arange(len(ids)), values)
        np.testing.assert_allclose(packed[where], alone, rtol=1e-4, atol=1e-4)
        logp = alone - np.log(np.exp(alone).sum(-1, keepdims=True))
        targets, w = rows["targets"][0][where], rows["loss_mask"][0][where]
        nll -= (logp[np.arange(len(where)), targets] * w).sum()
        weight += w.sum()
    assert (rows["segment_ids"][0] == 0).any()  # the row really has padding
    loss, aux = jax.jit(next_token_nll, static_argnums=1)(params, CFG, rows)
    assert float(aux["tokens"]) == weight
    np.testing.assert_allclose(float(loss), nll, rtol=1e-4)


def test_ptuning_template_and_prepend_placements():
    """`prepend` is PEFT's P_TUNING placement, the same as prompt tuning for the same vectors;
    the template places them elsewhere and computes something else."""
    ids, mask = np.asarray([1, 10, 11, 12, 20, 21, 2]), np.asarray([0, 0, 0, 0, 1, 1, 1], bool)
    vectors = {"embeddings": 0.5 * jax.random.normal(jax.random.key(5), (4, CFG.hidden))}
    params = {**BASE, "prompt": vectors}
    prompt_ids, _ = peft.add_virtual_slots((ids, mask), peft_cfg("prompt"))
    prepend, prepend_mask = peft.add_virtual_slots(
        (ids, mask), peft_cfg("ptuning", ptuning_placement=_runtime("prepend")))
    template, _ = peft.add_virtual_slots((ids, mask), peft_cfg("ptuning"))
    np.testing.assert_array_equal(prepend, prompt_ids)
    np.testing.assert_array_equal(prepend, [-1, -2, -3, -4, 1, 10, 11, 12, 20, 21, 2])
    np.testing.assert_array_equal(prepend_mask, [0] * 8 + [1, 1, 1])
    np.testing.assert_array_equal(template, [1, -1, -2, 10, 11, 12, -3, -4, 20, 21, 2])
    by_prepend = np.asarray(soft_logits(params, prepend[None]))[0]
    np.testing.assert_array_equal(by_prepend, np.asarray(soft_logits(params, prompt_ids[None]))[0])
    by_template = np.asarray(soft_logits(params, template[None]))[0]
    assert np.abs(by_template[-3:] - by_prepend[-3:]).max() > 1e-3  # the completion's logits
    with pytest.raises(ValueError, match="peft.ptuning_placement: unknown placement 'zzz'"):
        peft.add_virtual_slots((ids, mask), peft_cfg("ptuning", ptuning_placement="zzz"))


def _cached_logits(params, tokens, chunks):
    """Logits of `tokens` fed through the KV cache in chunks, soft prompt / prefix included."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    inputs_embeds, positions, prefix = prompts.model_inputs(params, CFG, tokens, positions)
    cache = llama.init_cache(CFG, b, s, prefix=prefix)
    out, start = [], 0
    decode = jax.jit(llama.decode, static_argnums=1)
    for n in chunks:
        sl = slice(start, start + n)
        h, cache = decode(params, CFG, inputs_embeds[:, sl], positions[:, sl],
                          jnp.ones((b, n), jnp.int32), cache)
        out.append(llama.logits_from_hidden(params, CFG, h))
        start += n
    return jnp.concatenate(out, axis=1)


# P-tuning generates from the same virtual-token embeddings as prompt tuning (only the encoder
# in front differs); CI keeps prompt and prefix (the KV-cache path).
@pytest.mark.parametrize("method", ["prompt", pytest.param("ptuning", marks=pytest.mark.slow),
                                    "prefix"])
def test_cached_generation_with_soft_prompt_equals_uncached_forward(method):
    cfg = peft_cfg(method, encoder="lstm" if method == "ptuning" else "mlp",
                   reparam_hidden=16 if method == "prefix" else 0)
    params, _ = peft.apply(BASE, CFG, cfg, jax.random.key(2))
    params = perturb(params, prompts.TRAINABLE, scale=0.5)
    ids, mask = peft.add_virtual_slots((np.asarray([1, 40, 41, 42, 43, 44, 45, 46]),
                                        np.asarray([0, 0, 0, 0, 0, 1, 1, 1], bool)), cfg)
    tokens = jnp.asarray(np.stack([ids, ids[::-1].copy()]))
    full = soft_logits(params, tokens)
    np.testing.assert_allclose(_cached_logits(params, tokens, [5, 1, tokens.shape[1] - 6]),
                               full, rtol=1e-5, atol=1e-5)
    # The soft prompt matters: without it (virtual ids read as token 0 / no prefix) logits change.
    assert np.abs(np.asarray(forward(BASE, CFG, jnp.maximum(tokens, 0)) - full)).max() > 1e-3
    # Finalizing (dropping encoders / reparameterization) keeps the function.
    np.testing.assert_allclose(soft_logits(prompts.finalize(params), tokens), full,
                               rtol=1e-5, atol=1e-6)


def test_ptuning_places_virtual_tokens_inside_the_template():
    cfg = peft_cfg("ptuning")
    ids, mask = peft.add_virtual_slots((np.asarray([1, 10, 11, 12, 20, 21, 2]),
                                        np.asarray([0, 0, 0, 0, 1, 1, 1], bool)), cfg)
    np.testing.assert_array_equal(ids, [1, -1, -2, 10, 11, 12, -3, -4, 20, 21, 2])
    np.testing.assert_array_equal(mask, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])


def test_insert_virtual_never_duplicates_tokens():
    """All three places at once, and a loss on the first token (nothing before the completion
    but the first token): every original token appears once, in order."""
    ids = np.asarray([5, 6, 7])
    got, mask = prompts.insert_virtual(ids, np.asarray([1, 1, 0], bool), prepend=2, after_bos=1,
                                       before_completion=2)
    np.testing.assert_array_equal(got, [-1, -2, 5, -3, -4, -5, 6, 7])
    np.testing.assert_array_equal(mask, [0, 0, 1, 0, 0, 0, 1, 0])
    got, _ = prompts.insert_virtual(ids, np.zeros(3, bool), before_completion=1)
    np.testing.assert_array_equal(got, [5, 6, 7, -1])  # no completion yet: at the end (sampling)


def test_virtual_ids_pick_their_prompt_rows():
    """Id -1 is virtual token 0, -2 virtual token 1, ...; other ids are table rows."""
    rows = np.arange(3 * CFG.hidden, dtype=np.float32).reshape(3, CFG.hidden)
    params = {**BASE, "prompt": {"embeddings": jnp.asarray(rows)}}
    got = prompts.embed(params, CFG, jnp.asarray([[-1, -2, -3, 5]]))
    np.testing.assert_array_equal(got[0, :3], rows)
    np.testing.assert_array_equal(got[0, 3], BASE["embed"]["embedding"][5])


def test_packed_prompt_tuning_rows_equal_examples_alone():
    cfg = peft_cfg("prompt")
    params, _ = peft.apply(BASE, CFG, cfg, jax.random.key(2))
    params = perturb(params, prompts.TRAINABLE, scale=0.5)
    a = peft.add_virtual_slots((np.asarray([1, 30, 31, 32]), np.ones(4, bool)), cfg)
    b = peft.add_virtual_slots((np.asarray([1, 50, 51]), np.ones(3, bool)), cfg)
    rows = D.pack([a, b], 32)
    packed = soft_logits(params, rows["inputs"], rows["positions"], rows["segment_ids"])
    for seg, (ids, _) in enumerate([a, b], start=1):
        where = np.nonzero(rows["segment_ids"][0] == seg)[0]
        alone = soft_logits(params, ids[None])[0]
        np.testing.assert_allclose(packed[0, where], alone, rtol=1e-5, atol=1e-5)


def test_lora_parts_follow_the_base_sharding():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = lora.inject(BASE, jax.random.key(2), rank=4)
    sh = sharding.param_shardings(params, mesh, sharding.DEFAULT_RULES)
    q = sh["layers_0"]["attn"]["q"]["kernel"]
    P = jax.sharding.PartitionSpec
    assert q.base.spec == P("fsdp", "tensor")
    # b's own axes name only the rank and `tensor`: it is stored split over `fsdp` as well
    assert q.a.spec == P("fsdp", None) and q.b.spec == P(None, ("tensor", "fsdp"))


def test_adapters_refuse_to_merge_and_placements_differ():
    h = adapters.inject(BASE, jax.random.key(0), placement="houlsby", bottleneck=8)
    p = adapters.inject(BASE, jax.random.key(0), placement="pfeiffer", bottleneck=8)
    assert len(nodes.nodes_of(h)) == 2 * CFG.layers and len(nodes.nodes_of(p)) == CFG.layers
    with pytest.raises(ValueError, match="cannot be merged"):
        nodes.nodes_of(h)[0].materialize()


def test_lora_on_any_node_composes():
    """LoRA wraps whatever stands at a path, e.g. an IA3 node (QLoRA will wrap NF4)."""
    params = perturb(ia3.inject(BASE), ia3.TRAINABLE)
    both = perturb(lora.inject(params, jax.random.key(2), rank=4,
                               targets=r"attn/k/kernel$"), r"kernel/(a|b)$", key=9)
    node = both["layers_0"]["attn"]["k"]["kernel"]
    assert isinstance(node, lora.LoRA) and isinstance(node.base, ia3.IA3)
    merged = nodes.merge(both)
    np.testing.assert_allclose(forward(merged, CFG, TOKENS), forward(both, CFG, TOKENS),
                               rtol=1e-5, atol=1e-5)
    # ... and the other way round: IA3 wraps the LoRA node standing at its target.
    outer = ia3.inject(lora.inject(BASE, jax.random.key(2), rank=4, targets=r"attn/k/kernel$"))
    node = outer["layers_0"]["attn"]["k"]["kernel"]
    assert isinstance(node, ia3.IA3) and isinstance(node.base, lora.LoRA)


# ----------------------------------------------------------------------------- config and init


def _runtime(text):
    """`text` as a fresh string object, as a command-line override delivers it (not interned)."""
    return "".join(list(text))


def test_apply_dispatches_on_method_names_read_at_run_time():
    expected = {"full": None, "lora": lora.LoRA, "dora": lora.DoRA, "ia3": ia3.IA3,
                "adapter": adapters.Adapter, "prompt": "prompt", "ptuning": "prompt",
                "prefix": "prefix"}
    for method, kind in expected.items():
        params, trainable = peft.apply(BASE, CFG, peft_cfg(_runtime(method)), jax.random.key(2))
        if kind is None:
            assert trainable == ".*" and params is BASE
        elif isinstance(kind, str):
            assert set(params) == set(BASE) | {kind}, method
        else:
            found = {type(n) for n in nodes.nodes_of(params)}
            assert found == {kind}, (method, found)
    with pytest.raises(ValueError, match="peft.method: unknown method 'zzz'"):
        peft.apply(BASE, CFG, peft_cfg("zzz"), jax.random.key(2))


def test_full_fine_tuning_with_freeze_and_a_bad_regex():
    _, trainable = peft.apply(BASE, CFG, peft_cfg("full", freeze="^embed/"), jax.random.key(2))
    mask = dict(ptree.flatten_with_paths(ptree.select(BASE, trainable)))
    assert not mask["embed/embedding"] and mask["layers_0/attn/q/kernel"]
    with pytest.raises(re.error):
        peft.apply(BASE, CFG, peft_cfg("full", freeze="(unclosed"), jax.random.key(2))


@pytest.mark.parametrize("n,front", [(4, 2), (5, 2), (6, 3)])
def test_virtual_slots_split_ptuning_tokens_around_the_prompt(n, front):
    ids, mask = np.arange(1, 8), np.asarray([0, 0, 0, 0, 1, 1, 1], bool)
    got, _ = peft.add_virtual_slots((ids, mask), peft_cfg("ptuning", num_virtual=n))
    want = np.concatenate([[1], -np.arange(1, front + 1), [2, 3, 4],
                           -np.arange(front + 1, n + 1), [5, 6, 7]])
    np.testing.assert_array_equal(got, want)
    for method in ("prompt", "ptuning"):  # PEFT's placement: all in front
        got, _ = peft.add_virtual_slots((ids, mask), peft_cfg(method, num_virtual=n,
                                                              ptuning_placement="prepend"))
        np.testing.assert_array_equal(got, np.concatenate([-np.arange(1, n + 1), ids]))
    for method in ("full", "lora", "dora", "ia3", "adapter", "prefix"):
        same = peft.add_virtual_slots((ids, mask), peft_cfg(method, num_virtual=n))
        assert same[0] is ids and same[1] is mask, method  # no slots for these methods


def test_adapter_init_is_identity_with_small_random_down_projection():
    params = adapters.inject(BASE, jax.random.key(0), bottleneck=32)
    node = params["layers_0"]["mlp"]["down"]["kernel"]
    assert abs(float(np.std(node.down)) - 1e-3) < 1e-4
    assert not np.any(node.up) and not np.any(node.up_bias) and not np.any(node.down_bias)


@pytest.mark.slow  # ~16 s of eager ops; CI trains prompt and P-tuning from their default inits
def test_soft_prompt_initializations():
    table = np.asarray(BASE["embed"]["embedding"])
    key = jax.random.key(4)
    random = prompts.init_prompt_tuning(BASE, CFG, key, n=64, init=_runtime("random"))
    assert abs(np.std(random["prompt"]["embeddings"]) / np.std(table) - 1) < 0.1
    vocab = np.asarray(prompts.init_prompt_tuning(BASE, CFG, key, n=8, init=_runtime("vocab"))
                       ["prompt"]["embeddings"])
    rows = [int(np.argmin(np.abs(table - row).sum(-1))) for row in vocab]
    np.testing.assert_array_equal(vocab, table[rows])
    assert min(rows) >= 3 and len(set(rows)) > 1  # sampled rows, never pad/bos/eos
    text = prompts.init_prompt_tuning(BASE, CFG, key, n=5, init=_runtime("text"),
                                      text_ids=[10, 11])
    np.testing.assert_array_equal(text["prompt"]["embeddings"], table[[10, 11, 10, 11, 10]])
    for bad in ("zzz", "aaa"):
        with pytest.raises(ValueError, match=f"unknown prompt init '{bad}'"):
            prompts.init_prompt_tuning(BASE, CFG, key, n=4, init=bad)
    with pytest.raises(ValueError, match="non-empty text"):
        prompts.init_prompt_tuning(BASE, CFG, key, n=4, init="text", text_ids=[])

    mlp = prompts.init_ptuning(BASE, CFG, key, n=64, encoder=_runtime("mlp"), hidden=8)
    assert abs(float(np.std(mlp["prompt"]["inputs"])) - 0.02) < 0.002
    assert set(mlp["prompt"]["encoder"]) == {"hidden", "out"}
    lstm = prompts.init_ptuning(BASE, CFG, key, n=4, encoder=_runtime("lstm"), hidden=8)
    assert set(lstm["prompt"]["encoder"]) == {"lstm_forward", "lstm_backward", "hidden", "out"}
    assert prompts.encoder_kind(lstm["prompt"]["encoder"]) == "lstm"
    assert prompts.encoder_kind(mlp["prompt"]["encoder"]) == "mlp"
    # The LSTM really runs: changing a cell changes the virtual tokens (a tree misread as an
    # MLP's would ignore the cells).
    enc = lstm["prompt"]["encoder"]
    bumped = {**enc, "lstm_backward": jax.tree.map(lambda x: x + 0.5, enc["lstm_backward"])}
    delta = (prompts.virtual_tokens({**lstm["prompt"], "encoder": bumped})
             - prompts.virtual_tokens(lstm["prompt"]))
    assert float(jnp.abs(delta).max()) > 1e-3
    for bad in ("zzz", "aaa"):
        with pytest.raises(ValueError, match=f"unknown P-tuning encoder '{bad}'"):
            prompts.init_ptuning(BASE, CFG, key, n=4, encoder=bad, hidden=8)

    direct = prompts.init_prefix(BASE, CFG, key, n=64, reparam_hidden=0)["prefix"]
    assert set(direct) == {"embeddings"}
    assert abs(float(np.std(direct["embeddings"])) - 0.02) < 0.002
    assert set(prompts.init_prefix(BASE, CFG, key, n=4, reparam_hidden=-1)["prefix"]) == {"embeddings"}
    assert set(prompts.init_prefix(BASE, CFG, key, n=4, reparam_hidden=1)["prefix"]) == {"inputs", "mlp"}


def test_ia3_vectors_follow_their_side_of_the_weight():
    """Output-side vectors shard like the weight's output axis, input-side like its input axis;
    a node built with `side` from a run-time string scales its input."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = sharding.param_shardings(ia3.inject(BASE), mesh, sharding.DEFAULT_RULES)
    P = jax.sharding.PartitionSpec
    # kv heads and mlp hidden over `tensor`, and (stored, `sharding.split_for_storage`) `fsdp`
    assert sh["layers_0"]["attn"]["k"]["kernel"].ia3.spec == P(("tensor", "fsdp"))
    assert sh["layers_0"]["mlp"]["down"]["kernel"].ia3.spec == P(("tensor", "fsdp"))
    base = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)), jnp.float32)
    scale = jnp.asarray([2.0, -1.0, 0.5])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32)
    node = ia3.IA3(base=base, ia3=scale, side=_runtime("input"))
    np.testing.assert_allclose(node.linear(x, jnp.float32), (x * scale) @ base, rtol=1e-6)
    np.testing.assert_allclose(node.materialize(), scale[:, None] * base, rtol=1e-6)


def test_registry_names_each_methods_peft_type_merge_and_rate():
    """One record per method: the PEFT type its adapter file declares, whether `finalize` folds
    it into the weights, and a usable default learning rate."""
    from ptjax.interop import peft_format

    peft_types = {m.name: peft_format.METHODS[m.peft_file] if m.peft_file else None
                  for m in peft.METHODS.values()}
    assert peft_types == {"full": None, "lora": "LORA", "dora": "LORA", "ia3": "IA3",
                          "adapter": None, "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING",
                          "prefix": "PREFIX_TUNING"}
    mergeable = {name for name, m in peft.METHODS.items() if m.merges}
    assert mergeable == {"full", "lora", "dora", "ia3"}
    assert all(0 < m.default_lr < 0.1 for m in peft.METHODS.values())
    with pytest.raises(ValueError, match="peft.method: unknown method 'qlora'"):
        peft.method("qlora")

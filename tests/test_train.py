"""The SFT step: learning, exact gradient accumulation, trainable/frozen split, optimizer."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ptjax import data as D
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.train import optim, sft
from ptjax.train import state as state_lib
from ptjax.train.config import base_config

CFG = preset("tiny")


def demo_batches(n_batches, batch_size=8, seq_len=64, seed=0):
    tok = D.ByteTokenizer()
    examples = [D.encode_sft(r, tok, seq_len) for r in D.instruction_records(400, seed)]
    it = D.PackedBatches(examples, seq_len, batch_size, seed=seed)
    return [next(it) for _ in range(n_batches)]


def make_state(trainable=".*", lr=3e-3):
    params = llama.init_params(CFG, jax.random.key(0))
    tx = optax.adam(lr)
    return state_lib.create(params, ptree.select(params, trainable), tx, seed=0), tx


def test_sft_lowers_loss_on_demo_task():
    state, tx = make_state()
    step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))
    batches = demo_batches(40)
    losses = []
    for b in batches:
        state, m = step(state, b, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_gradient_accumulation_equals_one_big_batch():
    batch = demo_batches(1, batch_size=8)[0]
    s1, tx = make_state()
    s2, _ = make_state()
    step = jax.jit(sft.train_step, static_argnames=("model_cfg", "tx", "grad_accum"))
    big, m1 = step(s1, batch, None, model_cfg=CFG, tx=tx, grad_accum=1)
    acc, m2 = step(s2, batch, None, model_cfg=CFG, tx=tx, grad_accum=4)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    chex.assert_trees_all_close(big.trainable, acc.trainable, rtol=1e-4, atol=1e-6)


def test_loss_is_mean_nll_over_loss_tokens():
    batch = demo_batches(1)[0]
    state, tx = make_state()
    _, m = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))(state, batch, None)
    logits = np.asarray(jax.jit(llama.forward, static_argnums=1)(state.params, CFG, batch["inputs"], batch["positions"],
                                      batch["segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    w = batch["loss_mask"]
    np.testing.assert_allclose(m["loss"], (nll * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["tokens"], w.sum())


def test_frozen_leaves_get_no_update_and_no_optimizer_state():
    state, tx = make_state(trainable=r"layers_1/mlp/")
    before = state.params
    batch = demo_batches(1)[0]
    new, _ = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))(state, batch, None)
    after = new.params
    for path, leaf in ptree.flatten_with_paths(before):
        moved = not np.allclose(leaf, dict(ptree.flatten_with_paths(after))[path])
        assert moved == path.startswith("layers_1/mlp/"), path
    # Adam keeps two moments per trainable scalar, nothing for frozen ones.
    n_trainable = ptree.count(state.trainable)
    assert n_trainable == 3 * CFG.hidden * CFG.mlp
    assert ptree.count(state.opt_state) == 2 * n_trainable + 1  # + the step count


def test_weight_decay_mask_excludes_norms_biases_embeddings():
    params = llama.init_params(CFG, jax.random.key(0))
    mask = dict(ptree.flatten_with_paths(optim.weight_decay_mask(params, r"(norm|bias|embed)")))
    assert mask["layers_0/attn/q/kernel"] and mask["lm_head/kernel"]
    assert not mask["layers_0/attn_norm/scale"] and not mask["embed/embedding"]


def test_schedule_warmup_then_cosine_to_floor():
    c = base_config().optim
    c.lr, c.warmup_steps, c.final_lr_fraction = 1.0, 10, 0.1
    s = optim.learning_rate_schedule(c, 110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)


@pytest.mark.parametrize("name", ["adamx", "yogi"])  # sorting before and after "sgd"
def test_unknown_optimizer_is_named(name):
    c = ml_collections.ConfigDict(base_config().optim.to_dict())
    c.name = name
    with pytest.raises(ValueError, match=f"optim.name: unknown optimizer '{name}'"):
        optim.make_optimizer(c, {"w": jnp.ones(2)}, 10)


def test_optimizer_name_read_at_run_time():
    """Names arrive from the command line as fresh strings (not interned literals)."""
    c = ml_collections.ConfigDict(base_config().optim.to_dict())
    for name in ("adamw", "sgd"):
        c.name = "".join(list(name))
        assert c.name is not name
        optim.make_optimizer(c, {"w": jnp.ones(2)}, 10)


def test_lr_by_path_gives_matching_leaves_their_own_learning_rate():
    """Adam's first step moves every coordinate by lr (sign of the gradient): the head's group
    moves by its own lr, the rest by optim.lr, frozen holes stay holes."""
    c = ml_collections.ConfigDict(base_config().optim.to_dict())
    c.update(lr=1e-3, warmup_steps=0, final_lr_fraction=1.0, weight_decay=0.0, clip_norm=0.0,
             lr_by_path=((r"^value_head/", 0.5),))
    params = {"body": {"kernel": jnp.ones((3, 2))}, "value_head": {"kernel": jnp.ones((2, 1)),
                                                                   "bias": jnp.zeros(1)},
              "frozen": None}
    grads = jax.tree.map(lambda x: jnp.full_like(x, -2.0), params)
    tx = optim.make_optimizer(c, params, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["body"]["kernel"], 1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["value_head"]["kernel"], 0.5, rtol=1e-4)
    np.testing.assert_allclose(updates["value_head"]["bias"], 0.5, rtol=1e-4)
    assert updates["frozen"] is None

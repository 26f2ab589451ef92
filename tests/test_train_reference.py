"""The SFT train step against float64 autodiff of an independent plain-JAX model (`reference_model`).

SGD with a constant learning rate makes the update `-lr * g`, so the gradient's scale shows (Adam
would hide it); clipping, the weight-decay mask and gradient accumulation are each checked
against what the reference gradient says they must do, and `grad_norm` against its absolute value.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import data as D
from ptjax import nodes
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.peft import lora
from ptjax.train import optim, sft
from ptjax.train import state as state_lib
from ptjax.train.config import base_config

from reference_model import loss_and_grads_f64

CFG = preset("tiny")
LR = 0.5


def _params(seed=0, std=0.1):
    """Tiny-model params from numpy (no threefry compile), large enough that logits spread."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: llama.init_params(CFG, key), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape) if len(s.shape) == 2
                                              else 1 + 0.1 * rng.normal(size=s.shape), jnp.float32),
                        shapes)


PARAMS = _params()


def _batch(batch_size=8, seq_len=48, seed=0):
    tok = D.ByteTokenizer()
    examples = [D.encode_sft(r, tok, seq_len) for r in D.instruction_records(200, seed)]
    return next(D.PackedBatches(examples, seq_len, batch_size, seed=seed))


BATCH = _batch()
REF_LOSS, REF_GRADS = loss_and_grads_f64(PARAMS, CFG, BATCH)
REF_NORM = float(np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(REF_GRADS))))


def _optimizer(name="sgd", **overrides):
    c = base_config().optim
    c.name, c.lr, c.warmup_steps, c.final_lr_fraction, c.clip_norm = name, LR, 0, 1.0, 0.0
    for k, v in overrides.items():
        c[k] = v
    return optim.make_optimizer(c, PARAMS, total_steps=10)


def _step(tx, grad_accum=1, params=PARAMS, batch=BATCH, rng=None):
    state = state_lib.create(params, ptree.select(params, ".*"), tx, seed=0)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx, grad_accum=grad_accum))
    new, metrics = step(state, batch, rng)
    return new, jax.device_get(metrics)


def _applied_gradient(new):
    """The gradient an SGD step of rate LR applied: (params before - after) / LR, in float64."""
    return jax.tree.map(lambda after, before: (np.asarray(after, np.float64) - before) / -LR,
                        new.trainable, PARAMS)


def _assert_grads_close(got, want):
    for (path, g), w in zip(ptree.flatten_with_paths(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-4 * np.abs(w).max(), err_msg=path)


@pytest.mark.parametrize("causal_block", [0, 8], indirect=True)
def test_sgd_update_is_minus_lr_times_the_mean_loss_gradient(causal_block):
    if causal_block:
        assert len(llama.causal_query_blocks(BATCH["inputs"].shape[1])) == 6
    new, m = _step(_optimizer())
    _assert_grads_close(_applied_gradient(new), REF_GRADS)
    np.testing.assert_allclose(m["loss"], REF_LOSS, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], REF_NORM, rtol=1e-4)
    np.testing.assert_allclose(m["tokens"], BATCH["loss_mask"].sum())
    assert 20 < m["tokens"] < BATCH["loss_mask"].size  # a real subset of the positions
    chex.assert_type(new.step, jnp.int32)
    assert int(new.step) == 1


def test_clipping_scales_the_update_to_the_clip_norm():
    clip = 0.1 * REF_NORM
    new, m = _step(_optimizer(clip_norm=clip))
    _assert_grads_close(_applied_gradient(new), jax.tree.map(lambda g: g * clip / REF_NORM, REF_GRADS))
    np.testing.assert_allclose(m["grad_norm"], REF_NORM, rtol=1e-4)  # reported before clipping


def test_weight_decay_applies_to_kernels_only():
    wd = 0.2
    decayed, _ = _step(_optimizer("adamw", weight_decay=wd))
    plain, _ = _step(_optimizer("adamw", weight_decay=0.0))
    for path, d in ptree.flatten_with_paths(decayed.trainable):
        p = dict(ptree.flatten_with_paths(plain.trainable))[path]
        before = dict(ptree.flatten_with_paths(PARAMS))[path]
        want = -LR * wd * np.asarray(before) if path.endswith("kernel") else np.zeros(p.shape)
        np.testing.assert_allclose(np.asarray(d) - np.asarray(p), want, atol=1e-6, err_msg=path)


def test_accumulated_step_equals_the_reference_gradient_of_the_whole_batch():
    micro_tokens = BATCH["loss_mask"].reshape(4, -1).sum(-1)
    assert len(set(micro_tokens.tolist())) > 1  # unequal microbatches: a mean of means differs
    new, m = _step(_optimizer(), grad_accum=4)
    _assert_grads_close(_applied_gradient(new), REF_GRADS)
    np.testing.assert_allclose(m["loss"], REF_LOSS, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], REF_NORM, rtol=1e-4)


def test_eval_step_counts_against_reference():
    out = jax.device_get(jax.jit(functools.partial(sft.eval_step, model_cfg=CFG))(PARAMS, BATCH))
    np.testing.assert_allclose(out["nll_sum"] / out["tokens"], REF_LOSS, rtol=1e-5)
    np.testing.assert_allclose(out["tokens"], BATCH["loss_mask"].sum())


# Slow both ways (~20 s: a float64 reference); CI keeps bf16 frozen storage in
# tests/test_quant.py (QLoRA's gradient and dtypes, float32 scales beside a bf16 base).
@pytest.mark.parametrize("cast", [pytest.param(True, marks=pytest.mark.slow),
                                  pytest.param(False, marks=pytest.mark.slow)])
def test_bf16_preset_with_half_precision_frozen_base(cast):
    """LoRA on a bf16-compute model: frozen matrices stored in bf16 give the same loss and
    adapter gradients as frozen float32 ones (the matmuls cast to bf16 anyway), and both are
    close to the float64 reference."""
    cfg = preset("tiny", dtype="bfloat16")
    params = lora.inject(PARAMS, jax.random.key(1), rank=4, alpha=8.0)
    rng = np.random.default_rng(3)
    b_trained = {p: rng.normal(0, 0.1, n.b.shape).astype(np.float32)
                 for p, n in ptree.flatten_with_paths(params, nodes_as_leaves=True)
                 if isinstance(n, lora.LoRA)}
    params = ptree.map_with_path(
        lambda p, n: n.replace(b=jnp.asarray(b_trained[p])) if p in b_trained else n,
        params, nodes_as_leaves=True)
    tx = _optimizer()
    mask = ptree.select(params, lora.TRAINABLE)
    state = state_lib.create(params, mask, tx, seed=0,
                             frozen_matmul_dtype=jnp.bfloat16 if cast else None)
    frozen = dict(ptree.flatten_with_paths(state.frozen))
    want = jnp.bfloat16 if cast else jnp.float32
    chex.assert_type(frozen["layers_0/attn/q/kernel/base"], want)
    chex.assert_type(frozen["lm_head/kernel"], want)
    chex.assert_type([frozen["layers_0/attn_norm/scale"], frozen["final_norm/scale"],
                      frozen["embed/embedding"]], jnp.float32)  # looked up, not multiplied
    step = jax.jit(functools.partial(sft.train_step, model_cfg=cfg, tx=tx))
    new, m = step(state, BATCH, None)
    merged = nodes.merge(params)
    ref_loss, _ = loss_and_grads_f64(merged, CFG, BATCH)
    np.testing.assert_allclose(m["loss"], ref_loss, rtol=2e-2)
    # Same computation whichever way the frozen half is stored.
    other = state_lib.create(params, mask, tx, seed=0,
                             frozen_matmul_dtype=None if cast else jnp.bfloat16)
    new_other, m_other = step(other, BATCH, None)
    np.testing.assert_array_equal(m["loss"], m_other["loss"])
    chex.assert_trees_all_equal(new.trainable, new_other.trainable)

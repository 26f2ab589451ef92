"""Guard: every dot of the compiled bf16 train step is in the form XLA's fast CPU matmul takes.

A dot with a float32 operand, a transposed operand or a left operand that does not contract its
last dimension silently falls back to float32 speed (see ops.py); a timer would not notice.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

from hlo_dots import dots, slow_reasons
from ptjax import tree as ptree
from ptjax.bench import random_batch
from ptjax.models import llama
from ptjax.models.config import ModelConfig
from ptjax.train import sft
from ptjax.train import state as state_lib

CFG = ModelConfig(vocab_size=512, hidden=64, mlp=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                  dtype="bfloat16")


def compiled_step_hlo(cfg, trainable=".*", tie=False):
    import dataclasses

    cfg = dataclasses.replace(cfg, tie_embeddings=tie)
    params = llama.init_params(cfg, jax.random.key(0))
    tx = optax.adamw(1e-3)
    state = state_lib.create(params, ptree.select(params, trainable), tx, seed=0)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=cfg, tx=tx))
    return step.lower(state, random_batch(4, 64, cfg.vocab_size), jax.random.key(0)).compile().as_text()


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_train_step_dots_are_fast_form(tie):
    found = dots(compiled_step_hlo(CFG, tie=tie))
    # Forward, input-gradient and weight-gradient dots of 7 projections (once, in the body of
    # the scan over layers), attention and head.
    assert len(found) >= 3 * 7
    bad = [(d.instr.name, d.lhs.shape, d.rhs.shape, slow_reasons(d, "bf16")) for d in found
           if slow_reasons(d, "bf16")]
    assert not bad, bad


def test_checker_flags_plain_autodiff():
    """The guard must be able to fail: naive bf16 autodiff has f32 and transposed-contraction dots."""

    def loss(x, w):
        y = jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return jnp.sum(y * y)

    x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    reasons = [r for d in dots(hlo) for r in slow_reasons(d, "bf16")]
    assert any("f32" in r for r in reasons)
    assert any("contracts dim (0,)" in r for r in reasons)

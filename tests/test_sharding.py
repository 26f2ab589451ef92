"""Sharded training equals single-device training (8 simulated CPU devices, see conftest.py)."""

import functools

import jax
import numpy as np
import optax
import pytest

from ptjax import sharding
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.train import sft
from ptjax.train import state as state_lib
from test_train import demo_batches

CFG = preset("tiny")


def run_steps(mesh_shape, devices, batches):
    mesh = sharding.make_mesh(mesh_shape, devices)
    rules = sharding.DEFAULT_RULES
    params = llama.init_params(CFG, jax.random.key(0))
    tx = optax.adamw(3e-3)
    create = functools.partial(state_lib.create, trainable_mask=ptree.select(params, ".*"), tx=tx,
                               seed=0)
    shardings = sharding.param_shardings(jax.eval_shape(create, params), mesh, rules)
    state = jax.jit(create, out_shardings=shardings)(params)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    with sharding.use(mesh, rules):
        step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx),
                       in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)))
        losses = []
        for b in batches:
            state, m = step(state, jax.device_put(b, batch_sharding), jax.random.key(0))
            losses.append(float(m["loss"]))
    return losses, state


@pytest.mark.slow  # CI keeps tests/test_strategies.py's dp+fsdp+tp cases (the same 2x2x2 mesh)
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_2x2x2_mesh_matches_single_device():
    batches = demo_batches(5, batch_size=8)
    single, _ = run_steps({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], batches)
    sharded, state = run_steps({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), batches)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert single[-1] < single[0]
    # The weights really are split: a q kernel is sharded over fsdp (rows) and tensor (columns).
    q = state.trainable["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len({str(s.index) for s in q.addressable_shards}) == 4


def test_spec_for_drops_axes_that_do_not_divide():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.spec_for(("vocab", "embed"), (259, 32), mesh, sharding.DEFAULT_RULES)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_mesh_size_mismatch_is_explained():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 2})


def test_batch_rows_the_mesh_cannot_split_are_refused_by_name():
    """4 rows over data 2 x fsdp 2 split; 6 rows do not, and the error names the config key
    (the trainer checks `train.batch_size` before placing any batch)."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharding.check_rows_split(mesh, 4, "train.batch_size")
    with pytest.raises(ValueError, match=r"train.batch_size = 6 rows .* 4 data-parallel"):
        sharding.check_rows_split(mesh, 6, "train.batch_size")


def test_optimizer_state_of_adapters_with_learning_rate_groups_has_matching_shardings():
    """LoRA factors under `optim.lr_by_path` groups: each group's optax state leaves the other
    groups' factors out (MaskedNode inside a LoRA node); their shardings must leave them out
    too, or restoring a checkpoint into the state's structure fails (LoRA PPO, whose value
    head has its own group, could not start)."""
    import ml_collections

    from ptjax import checkpoint, peft
    from ptjax.train import optim
    from ptjax.train.config import base_config

    c = base_config()
    c.peft.method = "lora"
    params, trainable = peft.apply(llama.init_params(CFG, jax.random.key(0)), CFG, c.peft,
                                   jax.random.key(1))
    mask = ptree.trainable_mask(params, trainable)
    optim_cfg = ml_collections.ConfigDict(c.optim.to_dict())
    optim_cfg.lr_by_path = ((r"layers_0/", 1e-2),)
    tx = optim.make_optimizer(optim_cfg, ptree.split(params, mask)[0], 10)
    create = functools.partial(state_lib.create, trainable_mask=mask, tx=tx, seed=0)
    abstract = jax.eval_shape(create, params)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shardings = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    target = checkpoint.abstract_like(abstract, shardings)
    assert jax.tree.structure(target) == jax.tree.structure(abstract)

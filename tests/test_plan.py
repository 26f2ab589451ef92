"""The memory planner (`bench --plan`): shard bytes against the arrays a real run creates, and
the compiled step's accounting, on 8 simulated devices."""

import jax
import numpy as np
import pytest

from ptjax import bench, plan, sharding
from ptjax import tree as ptree
from ptjax.models.config import preset

CFG = preset("tiny", dtype="bfloat16")


def test_mesh_text_parses_and_names_a_bad_part():
    assert plan.parse_mesh("fsdp:8") == {"fsdp": 8}
    assert plan.parse_mesh("dp:2,fsdp:2,tp:2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert plan.mesh_devices("data:2,tensor:4") == 8
    with pytest.raises(ValueError, match="'expert:2'"):
        plan.parse_mesh("fsdp:4,expert:2")


@pytest.mark.parametrize("method", ["full", pytest.param("qlora", marks=pytest.mark.slow)])
def test_plan_bytes_equal_the_shards_of_a_real_state(method):
    """The plan's parameter and optimizer bytes per device equal those of a state built for
    real and laid out on the same mesh (a different route: concrete arrays' shards)."""
    import optax

    got = plan.plan(CFG, method, "fsdp:8", 8, 32, bench.method_params)
    mesh = sharding.make_mesh({"fsdp": 8})
    params = bench.host_init(CFG)
    params, trainable = bench.method_params(CFG, method, params)
    from ptjax.train import state as state_lib

    state = state_lib.create(params, ptree.trainable_mask(params, trainable), optax.adamw(1e-4),
                             seed=0, frozen_matmul_dtype=CFG.compute_dtype)
    state = jax.device_put(state, sharding.param_shardings(state, mesh, sharding.DEFAULT_RULES))
    device = jax.devices()[0]

    def on_device(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
                   if s.device == device) / 2**20

    analytic = got["analytic_mb"]
    np.testing.assert_allclose(analytic["parameters"],
                               on_device(state.trainable) + on_device(state.frozen), atol=0.01)
    np.testing.assert_allclose(analytic["optimizer_state"], on_device(state.opt_state), atol=0.01)
    assert got["devices"] == 8 and got["tokens_per_device"] == 32
    assert got["compiled_on"] == "cpu"
    none, full = got["compiled_remat_none_mb"], got["compiled_remat_full_mb"]
    assert full["temp"] < none["temp"]
    assert none["arguments"] >= analytic["parameters"] + analytic["optimizer_state"] - 0.02
    assert analytic["activations_remat_full"] < analytic["activations_remat_none"]


def test_plan_refuses_a_batch_the_mesh_cannot_split():
    with pytest.raises(ValueError, match="multiple of data x fsdp = 8"):
        plan.plan(CFG, "full", "fsdp:8", 4, 32, bench.method_params)

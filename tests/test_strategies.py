"""Parallelism strategies on 8 simulated CPU devices: every mesh trains as one device does.

The strategies are `--config.mesh.*` settings (README, Multi-process runs): data parallel,
FSDP (parameters and optimizer state split over `fsdp`), tensor parallel (heads and MLP
hidden over `tensor`) and their combinations, for full fine-tuning and for the LoRA and QLoRA
weight nodes, whose factors, codes and scales follow the base weight's sharding.
"""

import jax
import numpy as np
import pytest

from ptjax import sharding
from ptjax.models.config import preset
from ptjax.train import sft, trainer
from ptjax.train.config import base_config
from test_train import demo_batches

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = preset("tiny")
STRATEGIES = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "dp+tp": {"data": 4, "tensor": 2},
    "fsdp+tp": {"fsdp": 4, "tensor": 2},
    "dp+fsdp+tp": {"data": 2, "fsdp": 2, "tensor": 2},
}
METHODS = {"full": ("full", ""), "lora": ("lora", ""), "qlora": ("lora", "nf4")}


def _config(method: str):
    c = base_config()
    c.peft.method, c.quant.method = METHODS[method]
    c.peft.targets = "" if method == "full" else "(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"
    c.train.steps = 3
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 0
    return c


def _state_and_step(method: str, mesh_shape: dict, devices):
    config = _config(method)
    mesh = sharding.make_mesh(mesh_shape, devices)
    rules = sharding.DEFAULT_RULES
    state, shardings, _, tx = trainer.initial_state(config, CFG, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)
    jitted = trainer.jit_train_step(sft.train_step, CFG, tx, 1, shardings, batch_sharding, mesh)

    class Step:
        """The jitted step, traced (called or lowered) with the mesh's constraints active, as
        the trainer's loop traces it: jit traces on first use, not where it is made."""

        def __call__(self, *args):
            with sharding.use(mesh, rules):
                return jitted(*args)

        def lower(self, *args):
            with sharding.use(mesh, rules):
                return jitted.lower(*args)

    return state, Step(), batch_sharding


def _losses(method: str, mesh_shape: dict, devices, batches):
    state, step, batch_sharding = _state_and_step(method, mesh_shape, devices)
    losses = []
    for i, b in enumerate(batches):
        state, m = step(state, trainer.to_device(b, batch_sharding), jax.random.key(i))
        losses.append(float(m["loss"]))
    return losses


BATCHES = demo_batches(3, batch_size=8, seq_len=32)
_SINGLE: dict = {}


# Every strategy with full fine-tuning; the weight nodes on the two that split their weights
# most (FSDP alone, and all three axes).
# Plain data parallelism runs inside dp+tp and dp+fsdp+tp in CI; alone it is slow-marked.
CASES = [pytest.param(strategy, "full", marks=pytest.mark.slow) if strategy == "dp"
         else (strategy, "full") for strategy in STRATEGIES] + [
    ("fsdp", "lora"), ("fsdp", "qlora"), ("dp+fsdp+tp", "lora"),
    pytest.param("dp+fsdp+tp", "qlora", marks=pytest.mark.slow)]
# Strategies on which XLA's SPMD partitioner is known to replicate an operand and partition it
# again. Empty since layers run as one scan (the unrolled loop's 2 x 2 x 2 backward
# rematerialized one f32[2, 32, 32] operand) and the embedding table is gathered over FSDP
# before its lookup (the 2 x 2 x 2 mesh rematerialized the looked-up rows; the steps were
# then traced outside the mesh's constraints, which hid it). A case added here must warn.
KNOWN_REMAT: set = set()


@pytest.mark.parametrize("strategy,method", CASES)
def test_every_strategy_trains_as_one_device_does(strategy, method, capfd):
    if method not in _SINGLE:
        _SINGLE[method] = _losses(method, {}, jax.devices()[:1], BATCHES)
    capfd.readouterr()
    got = _losses(method, STRATEGIES[strategy], jax.devices(), BATCHES)
    np.testing.assert_allclose(got, _SINGLE[method], rtol=2e-5)
    assert _SINGLE[method][-1] < _SINGLE[method][0]
    # grouped-query attention under tensor parallelism compiles without XLA resharding a
    # whole tensor behind the program's back
    remat = "Involuntary full rematerialization" in capfd.readouterr().err
    assert remat == (strategy in KNOWN_REMAT and method == "full"), remat


def _bytes_on(tree, device) -> int:
    """Bytes of `tree`'s shards that live on `device`."""
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == device)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp_splits_parameters_and_optimizer_state_over_its_devices(method):
    """Per-device parameter + optimizer bytes under FSDP over 8 devices are an eighth of one
    device's, but for the few vectors (norms) too small or unnamed to split; the compiled
    step's own argument bytes per device fall the same way. For LoRA and QLoRA this takes the
    storage split of the node parts whose own axes name only `tensor` (LoRA's `b`, the NF4
    codes of q/k/v/gate/up)."""
    one_state, one_step, one_batch = _state_and_step(method, {}, jax.devices()[:1])
    state, step, batch_sharding = _state_and_step(method, {"fsdp": 8}, jax.devices())
    device = jax.devices()[0]
    total = _bytes_on((one_state.trainable, one_state.frozen, one_state.opt_state),
                      jax.devices()[0])
    per_device = _bytes_on((state.trainable, state.frozen, state.opt_state), device)
    unsplit = sum(leaf.nbytes for leaf in jax.tree.leaves(
        (state.trainable, state.frozen, state.opt_state)) if leaf.sharding.is_fully_replicated)
    assert unsplit < 0.05 * total
    assert per_device == pytest.approx((total - unsplit) / 8 + unsplit, rel=0.02)

    def argument_bytes(step, state, batch_sharding):
        batch = trainer.to_device(BATCHES[0], batch_sharding)
        compiled = step.lower(state, batch, jax.random.key(0)).compile()
        return compiled.memory_analysis().argument_size_in_bytes

    single_args = argument_bytes(one_step, one_state, one_batch)
    fsdp_args = argument_bytes(step, state, batch_sharding)
    assert fsdp_args < single_args / 4, (fsdp_args, single_args)


def test_nf4_codes_split_with_the_output_channels_and_are_stored_over_fsdp():
    """NF4 codes and block absmax run over [out, in] flattened, so they split where the output
    axis does: over `tensor` for q, over `fsdp` for o (whose output is `embed`). q's are
    stored split over `fsdp` too, minor to `tensor`, so gathering `fsdp` gives each device
    its `tensor` block."""
    P = jax.sharding.PartitionSpec
    state, _, _ = _state_and_step("qlora", {"fsdp": 4, "tensor": 2}, jax.devices())
    attn = state.frozen["layers_0"]["attn"]
    q, o = attn["q"]["kernel"].base, attn["o"]["kernel"].base
    assert q.codes.sharding.spec == P(("tensor", "fsdp")) and o.codes.sharding.spec == P("fsdp")
    assert q.absmax.sharding.spec == P(("tensor", "fsdp")) and o.absmax.sharding.spec == P("fsdp")
    assert {s.data.shape for s in o.codes.addressable_shards} == {(o.codes.shape[0] // 4,)}
    assert {s.data.shape for s in q.codes.addressable_shards} == {(q.codes.shape[0] // 8,)}


def test_storage_split_adds_fsdp_minor_to_the_largest_dimension_it_divides():
    P = jax.sharding.PartitionSpec
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2}, jax.devices())
    rules = sharding.DEFAULT_RULES
    split = sharding.split_for_storage
    assert split(P(None, "tensor"), (8, 64), mesh, rules) == P(None, ("tensor", "fsdp"))
    assert split(P(None, None), (16, 6), mesh, rules) == P("fsdp", None)  # 6 % 4 != 0
    assert split(P("fsdp", None), (16, 64), mesh, rules) == P("fsdp", None)  # already there
    assert split(P(None), (6,), mesh, rules) == P(None)  # nothing it divides
    assert split(P(), (), mesh, rules) == P()

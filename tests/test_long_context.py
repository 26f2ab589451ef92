"""Layers as a scan, blockwise attention for long sequences and the portable (GPU/TPU) kernel
path, each against the code path it replaces."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

from ptjax import bench, ops, sharding
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.train.losses import next_token_nll

CFG = preset("tiny")
PARAMS = llama.init_params(CFG, jax.random.key(0))


def _packed_batch(batch, seq, seed=0):
    """Random tokens packed as two documents per row, the second ending in padding."""
    b = bench.random_batch(batch, seq, CFG.vocab_size, seed)
    cut, pad = seq // 3, seq - seq // 10
    b["segment_ids"][:, cut:] = 2
    b["segment_ids"][:, pad:] = 0
    b["positions"][:, cut:] -= cut
    b["loss_mask"][:, pad:] = 0.0
    return jax.tree.map(jnp.asarray, b)


def _loss_and_grads(cfg, batch, params=PARAMS):
    fn = jax.jit(jax.value_and_grad(lambda p: next_token_nll(p, cfg, batch)[0]))
    return fn(params)


def test_scanned_layers_equal_the_unrolled_loop():
    batch = _packed_batch(2, 48)
    scanned = _loss_and_grads(CFG, batch)
    unrolled = _loss_and_grads(dataclasses.replace(CFG, scan_layers=False), batch)
    chex.assert_trees_all_close(scanned, unrolled, rtol=1e-5, atol=1e-7)
    def scans(cfg):  # the loss's own chunk loop is a scan too
        return str(jax.make_jaxpr(lambda p: next_token_nll(p, cfg, batch)[0])(PARAMS)).count("scan[")

    assert scans(CFG) == scans(dataclasses.replace(CFG, scan_layers=False)) + 1


def test_long_sequences_attend_blockwise_with_the_dense_numbers(monkeypatch):
    """Past 2 * KEY_BLOCK keys attention runs blockwise (here KEY_BLOCK=32: 150 keys are four
    whole blocks and a padded one); raising the threshold gives the dense kernel everywhere,
    the reference."""
    batch = _packed_batch(1, 150)
    monkeypatch.setattr(ops, "KEY_BLOCK", 32)
    blockwise = _loss_and_grads(dataclasses.replace(CFG, remat="full"), batch)  # fresh traces
    monkeypatch.setattr(ops, "KEY_BLOCK", 10**6)
    dense = _loss_and_grads(dataclasses.replace(CFG, scan_layers=False), batch)
    jax.clear_caches()  # no trace made under a patched threshold outlives the test
    chex.assert_trees_all_close(blockwise, dense, rtol=2e-5, atol=1e-6)


def _step_temp_bytes(seq, cfg=CFG):
    batch = jax.eval_shape(lambda: _packed_batch(1, seq))
    fn = jax.jit(jax.grad(lambda p, b: next_token_nll(p, cfg, b)[0]))
    return fn.lower(PARAMS, batch).compile().memory_analysis().temp_size_in_bytes


def test_step_scratch_memory_is_linear_in_sequence_length(monkeypatch):
    """From 512 to 1,024 tokens the train step's scratch memory grows about 2x with blockwise
    attention (KEY_BLOCK=64 here; 512 in real runs); with the dense kernel's probability
    residuals it grows well over 3x. What stays quadratic is the boolean [s, t] mask (one byte
    per pair, shared by every layer and head)."""
    monkeypatch.setattr(ops, "KEY_BLOCK", 64)
    scanned = dataclasses.replace(CFG, remat="none")  # fresh traces
    blockwise = _step_temp_bytes(1024, scanned) / _step_temp_bytes(512, scanned)
    monkeypatch.setattr(ops, "KEY_BLOCK", 10**6)
    unrolled = dataclasses.replace(CFG, scan_layers=False)
    dense = _step_temp_bytes(1024, unrolled) / _step_temp_bytes(512, unrolled)
    jax.clear_caches()
    assert blockwise < 2.3 < 3.2 < dense, (blockwise, dense)


def test_portable_kernels_give_the_cpu_kernels_numbers(monkeypatch):
    """The GPU/TPU path (plain transposes, bf16 residuals as they are) traced on CPU: the same
    loss and gradients in bf16 as the CPU layouts, for a short sequence and a blockwise one
    (KEY_BLOCK=32: 150 keys in five blocks)."""
    monkeypatch.setattr(ops, "KEY_BLOCK", 32)
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    for seq in (48, 150):
        batch = _packed_batch(1, seq)
        cpu = _loss_and_grads(cfg, batch)
        with ops.portable_kernels():
            portable = _loss_and_grads(dataclasses.replace(cfg, remat="full"), batch)
        chex.assert_trees_all_close(portable, cpu, rtol=2e-2, atol=2e-3)
    jax.clear_caches()


def test_gpu_fused_attention_gives_the_cpu_kernels_numbers(monkeypatch):
    """The GPU path (`ops.fused_attention`: `jax.nn.dot_product_attention`, cuDNN there) run
    with XLA's implementation on CPU: the same loss and gradients as the CPU kernels on packed
    rows with padding, every layer's attention going through it."""
    batch = _packed_batch(2, 48)
    cpu = _loss_and_grads(CFG, batch)
    calls = []

    def fused(*args):
        calls.append(args[0].shape)
        return original(*args, implementation="xla")

    original = ops.fused_attention
    monkeypatch.setattr(ops, "cudnn_attention_applies", lambda dtype, head_dim: True)
    monkeypatch.setattr(ops, "fused_attention", fused)
    gpu = _loss_and_grads(dataclasses.replace(CFG, scan_layers=False), batch)  # a fresh trace
    jax.clear_caches()
    assert calls == [(2, 48, CFG.heads, CFG.head_dim)] * CFG.layers, calls
    chex.assert_trees_all_close(gpu, cpu, rtol=2e-5, atol=1e-6)


@pytest.mark.slow  # the TPU kernel in Pallas interpret mode (~14 s); no TPU runs CI anyway
def test_tpu_splash_attention_gives_the_cpu_kernels_numbers(monkeypatch):
    """The TPU path (`ops.splash_attention`: JAX's Pallas splash kernel, causal within
    segments) in Pallas' interpret mode on CPU: the same loss and gradients as the CPU kernels
    on packed rows with padding, at a length the kernel pads to its 128-row blocks, every
    layer's attention going through it, alone and on a 2 x 2 mesh."""
    calls = []

    def splash(*args):
        calls.append(args[0].shape)
        return original(*args, interpret=True)

    original = ops.splash_attention
    batches = {seq: _packed_batch(2, seq) for seq in (200,)}
    cpu = {seq: _loss_and_grads(CFG, batch) for seq, batch in batches.items()}
    monkeypatch.setattr(ops, "splash_attention_applies", lambda: True)
    monkeypatch.setattr(ops, "splash_attention", splash)
    for seq, batch in batches.items():
        tpu = _loss_and_grads(dataclasses.replace(CFG, scan_layers=False), batch)  # fresh trace
        chex.assert_trees_all_close(tpu, cpu[seq], rtol=2e-5, atol=1e-6)
    # On a mesh the kernel runs on each device's rows and KV heads (shard_map): XLA cannot
    # partition a Pallas call and would otherwise gather its operands whole on every device.
    mesh = sharding.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    with sharding.use(mesh, sharding.DEFAULT_RULES):
        fn = jax.jit(jax.value_and_grad(lambda p, b: next_token_nll(p, CFG, b)[0]))
        assert "shard_map" in str(jax.make_jaxpr(fn)(PARAMS, batches[200]))
        sharded = fn(PARAMS, batches[200])
    chex.assert_trees_all_close(sharded, cpu[200], rtol=2e-5, atol=1e-6)
    jax.clear_caches()
    assert calls[:2] == [(2, 200, CFG.heads, CFG.head_dim)] * CFG.layers, calls

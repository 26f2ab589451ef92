"""Memory plan of a train step: per-device bytes before renting the hardware to run it.

    python -m ptjax.bench --plan --preset=llama2-7b --mesh=fsdp:8 --method=qlora \
        --batch=8 --seq=2048 --dtype=bfloat16

The step is lowered and compiled for the mesh from shapes alone (no weights exist, nothing
runs), once without and once with full rematerialization; the time each lowering and
compilation took is printed too (`compile_s_remat_*`: layers run as one scan, so it barely
grows with depth). Each plan prints two views side by side, because they answer different
questions:

- `compiled`: XLA's own accounting of the compiled SPMD program for one device: its arguments
  (parameters, optimizer state, batch) and its scratch (`temp`: gradients, saved activations
  and every intermediate at the peak). When planned on CPU it reflects the CPU backend's
  fusion decisions and the portable blockwise attention, not a GPU's cuDNN flash kernel or a
  TPU's layouts, so it is labelled with the backend that compiled it.
- `analytic`: the same quantities from shapes and shardings: parameters, optimizer state and
  gradients exactly (each array's shard), activations from a per-token count of what a layer
  keeps for the backward pass in this implementation (see `activation_bytes_per_token`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import sharding
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import ModelConfig
from ptjax.quant import nf4
from ptjax.train import sft
from ptjax.train import state as state_lib
from ptjax.train import trainer

MIB = 2**20


def parse_mesh(text: str) -> dict:
    """`fsdp:8` or `data:2,fsdp:4` (axes of `sharding.MESH_AXES`; `dp`/`tp` accepted) -> dict."""
    aliases = {"dp": "data", "tp": "tensor"}
    shape = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition(":")
        name = aliases.get(name.strip(), name.strip())
        if name not in sharding.MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh: {part!r} is not AXIS:SIZE with AXIS one of "
                             f"{sharding.MESH_AXES} (or dp, tp)")
        shape[name] = int(size)
    return shape


def mesh_devices(text: str) -> int:
    """How many devices a `--mesh` names (1 when empty)."""
    return math.prod(parse_mesh(text).values()) if text else 1


def abstract_state(cfg: ModelConfig, method: str, tx, method_params):
    """Shapes and dtypes of the train state of `method`, without a model's worth of memory.

    `method_params(cfg, method, params) -> (params, trainable regex)` applies the method (the
    benchmark's settings, so a plan matches a timed run). It gets zero weights, one shared
    array per distinct shape; NF4 quantization (host numpy, bit-exact with bitsandbytes, so it
    cannot run on abstract shapes) is computed once per shape and shared the same way: every
    weight is zero, so equal shapes give equal nodes. Only the state's shapes are kept.
    """
    shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    zeros: dict = {}
    params = jax.tree.map(
        lambda s: zeros.setdefault((s.shape, s.dtype), np.zeros(s.shape, s.dtype)), shapes)
    quantized: dict = {}
    original = nf4.quantize

    def quantize_once_per_shape(kernel, *args, **kwargs):
        key = (np.shape(kernel), args, tuple(sorted(kwargs.items())))
        if key not in quantized:
            quantized[key] = original(kernel, *args, **kwargs)
        return quantized[key]

    nf4.quantize = quantize_once_per_shape
    try:
        params, trainable = method_params(cfg, method, params)
    finally:
        nf4.quantize = original
    mask = ptree.trainable_mask(params, trainable)
    return jax.eval_shape(lambda p: state_lib.create(p, mask, tx, seed=0,
                                                     frozen_matmul_dtype=cfg.compute_dtype),
                          params)


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs) laid out by `shardings`: the
    largest shard of each leaf."""
    total = 0
    for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
        shape = s.shard_shape(leaf.shape) if leaf.shape else ()
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def activation_bytes_per_token(cfg: ModelConfig, remat: bool) -> int:
    """Bytes one layer keeps per token for the backward pass (compute dtype c, residual f32).

    Without remat: both norms' f32 inputs (8h), their c-typed outputs (2 * c * h), q, k, v and
    the attention output (c * (2 H d + 2 kv d)), a float32 logsumexp per head (4 H; blockwise
    attention) and the MLP's gate, up and product (3 c * mlp). With full remat a layer keeps
    only its f32 input (4h); one layer's full set is live again while it is recomputed.
    """
    c = jnp.dtype(cfg.compute_dtype).itemsize
    h, hd = cfg.hidden, cfg.head_dim
    if remat:
        return 4 * h
    return (8 * h + 2 * c * h + c * (2 * cfg.heads * hd + 2 * cfg.kv_heads * hd)
            + 4 * cfg.heads + 3 * c * cfg.mlp)


def plan(cfg: ModelConfig, method: str, mesh_text: str, batch: int, seq: int,
         method_params) -> dict:
    """Per-device memory of `method`'s train step on the mesh, compiled and analytic (MiB);
    `method_params` as in `abstract_state`."""
    import optax

    mesh = sharding.make_mesh(parse_mesh(mesh_text), jax.devices()[:mesh_devices(mesh_text)])
    rules = sharding.DEFAULT_RULES
    tx = optax.adamw(1e-4)
    state = abstract_state(cfg, method, tx, method_params)
    shardings = sharding.param_shardings(state, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % rows:
        raise ValueError(f"--batch={batch} must be a multiple of data x fsdp = {rows}")
    data = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
            for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    params_b = shard_bytes(state.trainable, shardings.trainable) + shard_bytes(
        state.frozen, shardings.frozen)
    opt_b = shard_bytes(state.opt_state, shardings.opt_state)
    grads_b = shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                       if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                       state.trainable), shardings.trainable)
    tokens = batch * seq // rows
    result = {
        "case": (f"plan-{cfg_name(cfg)}-L{cfg.layers}-{method}-{cfg.dtype}-b{batch}-s{seq}-"
                 f"{mesh_text or 'one'}"),
        "devices": mesh.size, "mesh": dict(mesh.shape), "tokens_per_device": tokens,
        "analytic_mb": {"parameters": params_b / MIB, "optimizer_state": opt_b / MIB,
                        "gradients": grads_b / MIB},
        "compiled_on": jax.default_backend(),
    }
    for remat in ("none", "full"):
        rcfg = dataclasses.replace(cfg, remat=remat)
        act = tokens * cfg.layers * activation_bytes_per_token(rcfg, remat == "full")
        result["analytic_mb"][f"activations_remat_{remat}"] = act / MIB
        start = time.perf_counter()
        with sharding.use(mesh, rules):
            step = trainer.jit_train_step(sft.train_step, rcfg, tx, 1, shardings,
                                          batch_sharding, mesh)
            compiled = step.lower(state, data, jax.random.key(0)).compile()
        result[f"compile_s_remat_{remat}"] = time.perf_counter() - start
        mem = compiled.memory_analysis()
        result[f"compiled_remat_{remat}_mb"] = {
            "arguments": mem.argument_size_in_bytes / MIB,
            "temp": mem.temp_size_in_bytes / MIB,
            "outputs_not_aliased": (mem.output_size_in_bytes - mem.alias_size_in_bytes) / MIB,
            "total": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                      + mem.output_size_in_bytes - mem.alias_size_in_bytes) / MIB,
        }
    return round_floats(result)


def cfg_name(cfg: ModelConfig) -> str:
    """The preset whose width `cfg` has (its depth may be overridden), else its width."""
    from ptjax.models.config import PRESETS

    for name, p in PRESETS.items():
        if (p.vocab_size, p.hidden, p.mlp, p.heads) == (
                cfg.vocab_size, cfg.hidden, cfg.mlp, cfg.heads):
            return name
    return f"width{cfg.hidden}"


def round_floats(tree):
    """Floats of a nested dict rounded to 0.01 MiB for printing."""
    if isinstance(tree, dict):
        return {k: round_floats(v) for k, v in tree.items()}
    return round(tree, 2) if isinstance(tree, float) else tree


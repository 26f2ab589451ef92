"""Meshes, logical-axis rules and multi-host initialization.

Parameters and key activations carry logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`,
`batch`, `length`, `norm`); the config's rules table maps them to the mesh axes `data`, `fsdp`
and `tensor`. The same program then runs on 1 CPU, 8 GPUs or a TPU pod: only the mesh shape and
the rules change. A dimension that the mapped mesh axes do not divide stays unsharded.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ptjax import tree as ptree

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("norm", None),
)

_ACTIVE = contextvars.ContextVar("ptjax_sharding", default=None)


def make_mesh(shape: dict, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one entry may be -1 to take the rest.

    Axis types are Auto: XLA propagates shardings from the annotated inputs (jax 0.10's
    `jax.make_mesh` defaults to Explicit, which would make every op's sharding a type error).
    """
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    n = len(devices) if devices is not None else jax.device_count()
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {n}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _rules(rules) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _axis_names(entry) -> tuple:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names) as a tuple."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def spec_for(logical_axes, shape, mesh: Mesh, rules) -> P:
    """PartitionSpec of one array: its logical names through the rules, dropping any mesh axis
    that does not divide the dimension (small heads or vocabularies stay replicated)."""
    spec = nn.logical_to_mesh_axes(logical_axes, _rules(rules))
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = _axis_names(axes)
        size = math.prod(mesh.shape[a] for a in names)
        fixed.append(axes if names and dim % size == 0 else None)
    return P(*fixed)


def param_logical_axes(path: str, ndim: int):
    """Logical axes of a parameter by its path (PARAM_AXES); unknown parameters are unnamed."""
    from ptjax.models.llama import PARAM_AXES  # the model imports `constrain` from here

    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def param_shardings(params, mesh: Mesh, rules):
    """NamedSharding for every leaf. A weight node's parts take their axes from the array it
    wraps (each node type says how, in `part_axes`), so LoRA factors, quantization scales and
    their optimizer moments follow the base weight's sharding.

    A node part that those axes leave whole over the FSDP axes (LoRA's `b`, the NF4 codes of
    q/k/v/gate/up: they split only with the output axis, which maps to `tensor`) is stored
    split over them as well (`split_for_storage`), so FSDP holds an Nth of every weight. XLA
    gathers such a part where the layer uses it, as it gathers any FSDP weight (an explicit
    gather there measured more scratch memory for the same collectives).
    """

    def array_sharding(axes, leaf, in_node):
        spec = spec_for(axes, np.shape(leaf), mesh, rules)
        if in_node:
            spec = split_for_storage(spec, np.shape(leaf), mesh, rules)
        return NamedSharding(mesh, spec)

    def part_sharding(v, axes):
        if ptree.is_weight_node(v):
            return node_sharding(v, axes)
        if not jax.tree.leaves(v):  # a part an optimizer state leaves out (optax.MaskedNode)
            return v
        return array_sharding(axes, v, in_node=True)

    def node_sharding(node, axes):
        parts = node.part_axes(axes)
        return node.map_parts(lambda name, v: part_sharding(v, parts[name]))

    def one(path, leaf):
        if ptree.is_weight_node(leaf):
            return node_sharding(leaf, param_logical_axes(path, 2))
        return array_sharding(param_logical_axes(path, np.ndim(leaf)), leaf, in_node=False)

    return ptree.map_with_path(one, params, nodes_as_leaves=True)


def split_for_storage(spec: P, shape, mesh: Mesh, rules) -> P:
    """`spec` with the FSDP axes (the mesh axes `embed` maps to) added, minor to the axes
    already there, to the largest dimension they divide, when `spec` does not use them yet.

    Why minor: gathering the FSDP axes back then leaves every device exactly the block `spec`
    gives it (an all-gather within each FSDP group, no reshuffle).
    """
    storage = _axis_names(nn.logical_to_mesh_axes(("embed",), _rules(rules))[0])
    entries = list(spec) + [None] * (len(shape) - len(spec))
    names = [_axis_names(e) for e in entries]
    used = {a for n in names for a in n}
    extra = tuple(a for a in storage if a not in used and mesh.shape[a] > 1)
    if not extra:
        return spec
    split = math.prod(mesh.shape[a] for a in extra)
    fits = [i for i, dim in enumerate(shape)
            if dim % (math.prod(mesh.shape[a] for a in names[i]) * split) == 0]
    if not fits:
        return spec
    best = max(fits, key=lambda i: shape[i])
    entries[best] = names[best] + extra
    return P(*entries)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of [batch, length, ...] host arrays: batch split over the data-parallel axes."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), _rules(rules))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, RNG keys, step counters)."""
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def use(mesh: Mesh, rules):
    """Make `constrain` active while tracing model code for this mesh and rules."""
    token = _ACTIVE.set((mesh, _rules(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, logical_axes):
    """Annotate an activation with logical axes (no-op outside `use`), so XLA keeps e.g. the
    residual stream batch-sharded instead of guessing."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, spec_for(logical_axes, x.shape, mesh, rules)))


def per_shard(fn, args, logical_axes, out_axes):
    """`fn(*args)` run on each device's block of `args` (`jax.shard_map`) when a mesh is active
    (`use`), else called as it is. `logical_axes` names each argument's dimensions and
    `out_axes` the result's; a dimension whose mesh axes do not divide it stays whole.

    Why: XLA cannot partition a custom kernel (a Pallas call), so under jit with sharded
    operands it would gather them whole onto every device; `fn` must be independent across
    the split dimensions (attention rows and heads are).
    """
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    in_specs = tuple(spec_for(axes, x.shape, mesh, rules) for axes, x in zip(logical_axes, args))
    out_spec = spec_for(out_axes, jax.eval_shape(fn, *args).shape, mesh, rules)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                         check_vma=False)(*args)


def constrain_stacked_layers(stacked):
    """Annotate layer parameters stacked along a leading layer axis (`llama.stack`) with their
    per-layer shardings and the layer axis whole (no-op outside `use`).

    Why: the stack is a new array inside the step; without its sharding XLA may gather every
    layer's weights onto each device before the scan, losing FSDP's 1/N.
    """
    active = _ACTIVE.get()
    if active is None:
        return stacked
    mesh, rules = active
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
    shardings = param_shardings(one_layer, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, *s.spec))),
        stacked, shardings)


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1):
    """Start JAX's multi-controller runtime when running one process per host.

    With no arguments, JAX auto-detects cluster environments (TPU pods, SLURM, Open MPI); a
    single process with nothing to detect skips initialization.
    """
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_ID",
                                       "CLOUD_TPU_TASK_ID")):
        jax.distributed.initialize()


def check_rows_split(mesh, rows: int, what: str):
    """Refuse batches whose rows the mesh's data-parallel devices cannot split evenly; `what`
    names the config keys that set `rows`."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % devices:
        raise ValueError(f"{what} = {rows} rows per batch, which {devices} data-parallel "
                         "devices cannot split evenly")

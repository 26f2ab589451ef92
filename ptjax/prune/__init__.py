"""Pruning as pure transforms of the parameter pytree.

`apply(params, prune_cfg)` wraps every kernel `prune.targets` matches in a `Masked` node whose
boolean mask (beside the weight, frozen) keeps the weights the criterion chose: `magnitude`
(per layer), `global` (one threshold over all targets), `random` (the baseline), or from
calibration text `wanda` and `sparsegpt` (which also updates the kept weights), each optionally
with N:M structure along the input dimension (`prune.structure="2:4"`) or, for magnitude and
random, the same fraction in every output row (`prune.structure="row"`, Wanda's comparison
group). The pruned entries of the weight are set to zero and the forward pass multiplies by the
mask, so the effective weights stay exactly zero through any optimizer: the mask is applied in the forward pass, so a pruned
entry takes no gradient, and whatever the stored entry does (Adam's leftover moments after a
gradual mask update) never reaches the model. `report` gives the sparsity per layer and overall.

Gradual pruning (`prune.end_step` > 0) starts from masks at `prune.initial_sparsity` and the
trainer calls `update_masks` on Zhu & Gupta's schedule (`ptjax.prune.schedule`).
"""

from __future__ import annotations

import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ptjax import ops
from ptjax import tree as ptree
from ptjax.nodes import WeightNode
from ptjax.prune import masks, schedule

DEFAULT_TARGETS = r"layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"
CRITERIA = ("", "magnitude", "global", "random", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


@flax.struct.dataclass
class Masked(WeightNode):
    """A kernel (array or node) with a boolean keep-mask of its shape: `w * mask`."""

    base: jnp.ndarray
    mask: jnp.ndarray

    def linear(self, x, dtype, rng=None):
        return ops.dense(x, self.materialize(), dtype)

    def materialize(self):
        w = ops.materialize(self.base)
        return jnp.where(self.mask, w, jnp.zeros((), w.dtype))

    def part_axes(self, axes):
        return {"base": axes, "mask": axes}


def parse_structure(structure: str) -> tuple[int, int] | None:
    """"2:4" -> (2, 4); "" or "row" -> None (unstructured: over the layer, or per output row)."""
    if structure in ("", "row"):
        return None
    match = re.fullmatch(r"(\d+):(\d+)", structure)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"prune.structure: {structure!r} is not N:M with 0 < N < M (e.g. 2:4)")
    return int(match.group(1)), int(match.group(2))


def check(prune_cfg) -> None:
    """Refuse unknown criteria and malformed settings, naming the key."""
    if prune_cfg.method not in CRITERIA:
        raise ValueError(f"prune.method: unknown criterion {prune_cfg.method!r}; choose one of "
                         f"{CRITERIA[1:]} (or '' for none)")
    structure = parse_structure(prune_cfg.structure)
    if structure and prune_cfg.method == "global":
        raise ValueError("prune.structure: N:M masks are chosen per group of M inputs, not by "
                         "one global threshold; use prune.method=magnitude")
    if prune_cfg.structure == "row" and prune_cfg.method in ("global", "sparsegpt"):
        raise ValueError(f"prune.structure: 'row' compares weights within each output; "
                         f"prune.method={prune_cfg.method!r} does not (use magnitude or random)")
    if not structure:
        masks.keep_count(1, prune_cfg.sparsity)  # range check
    if is_gradual(prune_cfg):
        if prune_cfg.method in CALIBRATED or structure:
            raise ValueError(f"prune.end_step: gradual pruning raises an unstructured sparsity "
                             f"step by step; prune.method={prune_cfg.method!r}"
                             f"{' with prune.structure' if structure else ''} prunes once "
                             "(set prune.end_step=0)")
        if not 0.0 <= prune_cfg.initial_sparsity <= prune_cfg.sparsity:
            raise ValueError(f"prune.initial_sparsity: {prune_cfg.initial_sparsity} must lie in "
                             f"[0, prune.sparsity={prune_cfg.sparsity}]")
        gradual_sparsity(prune_cfg, 0)  # start < end, every > 0
    re.compile(prune_cfg.targets or DEFAULT_TARGETS)


def is_gradual(prune_cfg) -> bool:
    """Whether masks follow the Zhu & Gupta schedule during training (`prune.end_step` > 0)."""
    return bool(prune_cfg.method) and prune_cfg.end_step > 0


def gradual_sparsity(prune_cfg, step: int) -> float:
    """The schedule's sparsity at `step` (`schedule.sparsity_at` with the config's settings)."""
    return schedule.sparsity_at(step, start=prune_cfg.start_step, end=prune_cfg.end_step,
                                every=prune_cfg.every, final=prune_cfg.sparsity,
                                initial=prune_cfg.initial_sparsity)


def is_mask_update(prune_cfg, step: int) -> bool:
    """Whether a gradual run recomputes its masks after `step` steps."""
    return is_gradual(prune_cfg) and schedule.is_update_step(
        step, start=prune_cfg.start_step, end=prune_cfg.end_step, every=prune_cfg.every)


def update_masks(params, prune_cfg, step: int):
    """Gradual pruning's mask update after `step` steps: masks chosen again by the criterion from
    the current effective weights, at the schedule's sparsity. Scores come from the masked weight,
    so a pruned entry (zero) is never chosen back while the sparsity only rises."""
    return with_masks(params, choose_masks(targets(params, prune_cfg), prune_cfg,
                                           gradual_sparsity(prune_cfg, step)))


def targets(params, prune_cfg) -> dict[str, np.ndarray]:
    """path -> float32 host copy of every kernel the config prunes."""
    regex = re.compile(prune_cfg.targets or DEFAULT_TARGETS)
    found = {p: np.asarray(jax.device_get(ops.materialize(w)), np.float32)
             for p, w in ptree.flatten_with_paths(params, nodes_as_leaves=True)
             if regex.search(p) and len(np.shape(w)) == 2}
    if not found:
        raise ValueError(f"prune.targets: {prune_cfg.targets or DEFAULT_TARGETS!r} matches no "
                         "2-D weight")
    return found


def choose_masks(weights: dict[str, np.ndarray], prune_cfg,
                 sparsity: float | None = None) -> dict[str, np.ndarray]:
    """Keep-masks for `weights` (path -> [in, out]) by the configured criterion, at `sparsity`
    (default `prune.sparsity`)."""
    sparsity = prune_cfg.sparsity if sparsity is None else sparsity
    structure = parse_structure(prune_cfg.structure)
    if prune_cfg.method == "global":
        return masks.global_magnitude(weights, sparsity)
    out = {}
    for i, (p, w) in enumerate(weights.items()):
        s = (masks.random_scores(w.shape, prune_cfg.seed + i) if prune_cfg.method == "random"
             else np.abs(w))
        if structure:
            out[p] = masks.n_of_m(s, *structure)
        elif prune_cfg.structure == "row":
            out[p] = masks.per_output(s, sparsity)
        else:
            out[p] = masks.top_k_mask(s, masks.keep_count(w.size, sparsity))
    return out


def with_masks(params, chosen: dict[str, np.ndarray]):
    """`params` with each chosen kernel wrapped as `Masked(base with pruned entries zeroed,
    mask)`; an existing `Masked` node gets its mask replaced (gradual pruning)."""

    def wrap(path, w):
        if path not in chosen:
            return w
        mask = jnp.asarray(chosen[path])
        base = w.base if isinstance(w, Masked) else w
        if not ptree.is_weight_node(base):
            base = jnp.where(mask, base, jnp.zeros((), base.dtype))
        return Masked(base=base, mask=mask)

    return ptree.map_with_path(wrap, params, nodes_as_leaves=True)


def apply(params, prune_cfg, model_cfg=None, calibration_tokens=None):
    """One-shot pruning of `params` by `prune_cfg` (unchanged when `prune.method` is empty); for
    a gradual schedule, the masks of step 0 (`prune.initial_sparsity`), which the trainer then
    updates (`update_masks`).

    Calibrated criteria (`wanda`) also need the model config and `calibration_tokens`
    [rows, seq] of representative text (see `calibration_rows`).
    """
    check(prune_cfg)
    if not prune_cfg.method:
        return params
    if prune_cfg.method in CALIBRATED:
        if model_cfg is None or calibration_tokens is None:
            raise ValueError(f"prune.method={prune_cfg.method!r} needs calibration tokens and the "
                             "model config")
        return calibrated(params, model_cfg, prune_cfg, calibration_tokens)
    if is_gradual(prune_cfg):  # the masks exist from the start; the trainer updates them
        return update_masks(params, prune_cfg, 0)
    weights = targets(params, prune_cfg)
    return with_masks(params, choose_masks(weights, prune_cfg))


def calibration_rows(examples, seq_len: int, rows: int) -> np.ndarray:
    """[rows, seq_len] int32 token rows cut from the concatenated ids of `(ids, ...)` examples
    (what a run trains on stands in for calibration text)."""
    ids = np.concatenate([np.asarray(e[0], np.int32).reshape(-1) for e in examples])
    rows = min(rows, ids.size // seq_len)
    if rows < 1:
        raise ValueError(f"prune.calibration_rows: the data holds {ids.size} tokens, fewer than "
                         f"one row of {seq_len}")
    return ids[:rows * seq_len].reshape(rows, seq_len)


def calibrated(params, model_cfg, prune_cfg, tokens):
    """Wanda or SparseGPT, layer by layer: each layer's kernels are pruned from their inputs X
    given the layers pruned before it, then the pruned layer runs to give the next layer's
    inputs. Wanda scores |W| * ||X_i|| and keeps the top of each output (or N:M); SparseGPT also
    updates the kept weights to compensate (`calibration.sparsegpt`)."""
    from ptjax.models import llama
    from ptjax.prune import calibration

    regex = re.compile(prune_cfg.targets or DEFAULT_TARGETS)
    structure = parse_structure(prune_cfg.structure)
    weights = targets(params, prune_cfg)
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    segments = jnp.ones_like(tokens)
    mask = llama.attention_mask(positions, segments, positions, segments)
    rotary = llama.rotary_tables(model_cfg, positions)
    x = llama.embed_tokens(params, model_cfg, tokens)
    for i in range(model_cfg.layers):
        name = f"layers_{i}"
        grams = calibration.input_grams(params[name], model_cfg, x, rotary, mask, regex,
                                           name)
        chosen, updated = {}, {}
        for path, (gram, count) in grams.items():
            if prune_cfg.method == "sparsegpt":
                updated[path], chosen[path] = calibration.sparsegpt(
                    weights[path], gram, count, prune_cfg.sparsity, structure)
                continue
            scores = calibration.wanda_scores(weights[path], np.sqrt(np.diag(gram)))
            chosen[path] = (masks.n_of_m(scores, *structure) if structure
                            else masks.per_output(scores, prune_cfg.sparsity))
        params = with_masks(_replace(params, updated), chosen)
        x, _ = llama.decoder_layer(params[name], model_cfg, x, rotary, mask)
    return params


def _replace(params, new_kernels: dict):
    """`params` with the kernels at the given paths replaced (SparseGPT's updated weights)."""
    if not new_kernels:
        return params
    return ptree.map_with_path(lambda p, w: jnp.asarray(new_kernels[p]) if p in new_kernels else w,
                               params, nodes_as_leaves=True)


def report(params) -> dict:
    """Sparsity (fraction of exact zeros in the effective weight) per masked kernel and over
    all of them, plus the kept and total counts."""
    layers, zeros, total = {}, 0, 0
    for path, node in ptree.flatten_with_paths(params, nodes_as_leaves=True):
        if isinstance(node, Masked):
            w = np.asarray(jax.device_get(node.materialize()))
            z = int(np.sum(w == 0))
            layers[path] = z / w.size
            zeros, total = zeros + z, total + w.size
    return {"layers": layers, "overall": zeros / total if total else 0.0,
            "zeros": zeros, "total": total}

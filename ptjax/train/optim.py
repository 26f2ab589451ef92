"""Optimizer from config: AdamW (or SGD), warmup + cosine, global-norm clipping, decay mask by path."""

from __future__ import annotations

import re

import optax

from ptjax import tree as ptree


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * final_lr_fraction` at `total_steps`."""
    warmup = int(optim_cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(optim_cfg.lr),
        warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1),
        end_value=float(optim_cfg.lr) * float(optim_cfg.final_lr_fraction),
    )


def weight_decay_mask(trainable, exclude_regex: str):
    """True for leaves that get weight decay: every trainable leaf whose path does not match
    `exclude_regex` (by default norms, biases and embeddings)."""
    regex = re.compile(exclude_regex) if exclude_regex else None
    return ptree.map_with_path(lambda p, _: not (regex and regex.search(p)), trainable)


def make_optimizer(optim_cfg, trainable, total_steps: int) -> optax.GradientTransformation:
    """The optax chain a config asks for; `trainable` only shapes the decay mask."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    name = optim_cfg.name
    if name == "adamw":
        parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay,
                                 mask=weight_decay_mask(trainable, optim_cfg.no_decay)))
    elif name == "sgd":
        parts.append(optax.sgd(schedule, momentum=optim_cfg.momentum or None))
    else:
        raise ValueError(f"optim.name: unknown optimizer {name!r}; choose 'adamw' or 'sgd'")
    return optax.chain(*parts)

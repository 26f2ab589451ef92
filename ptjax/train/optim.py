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


def _base_optimizer(optim_cfg, schedule, trainable) -> optax.GradientTransformation:
    """AdamW or SGD at `schedule`."""
    name = optim_cfg.name
    if name == "adamw":
        return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay,
                           mask=weight_decay_mask(trainable, optim_cfg.no_decay))
    if name == "sgd":
        return optax.sgd(schedule, momentum=optim_cfg.momentum or None)
    raise ValueError(f"optim.name: unknown optimizer {name!r}; choose 'adamw' or 'sgd'")


def make_optimizer(optim_cfg, trainable, total_steps: int) -> optax.GradientTransformation:
    """The optax chain a config asks for; `trainable` shapes the decay mask and the groups.

    `optim.lr_by_path` holds `(regex, lr)` pairs: trainable leaves whose path matches a regex
    (the first that does) take that peak learning rate, with the same warmup and decay, like
    PyTorch's parameter groups. Why: a freshly initialized head next to a pretrained body (PPO's
    value head) needs a learning rate far above the body's.
    """
    parts = []
    if optim_cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    groups = [(re.compile(regex), float(lr)) for regex, lr in optim_cfg.lr_by_path]
    if not groups:
        parts.append(_base_optimizer(optim_cfg, learning_rate_schedule(optim_cfg, total_steps),
                                     trainable))
        return optax.chain(*parts)

    def label(path, _):
        return next((str(i) for i, (regex, _) in enumerate(groups) if regex.search(path)),
                    "default")

    labels = ptree.map_with_path(label, trainable)
    transforms = {"default": _base_optimizer(
        optim_cfg, learning_rate_schedule(optim_cfg, total_steps), trainable)}
    for i, (_, lr) in enumerate(groups):
        group_cfg = optim_cfg.copy_and_resolve_references()
        group_cfg.lr = lr
        transforms[str(i)] = _base_optimizer(
            group_cfg, learning_rate_schedule(group_cfg, total_steps), trainable)
    parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts)

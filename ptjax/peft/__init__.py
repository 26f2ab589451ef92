"""Parameter-efficient fine-tuning as pure transforms of the parameter pytree.

`apply` turns a base model's params into a method's params and names which paths train; the
rest of the stack (split into trainable/frozen, optimizer, checkpoints) needs nothing else.
"""

from __future__ import annotations

import re

import numpy as np

from ptjax.peft import adapters, ia3, lora, prompts

METHODS = ("full", "lora", "dora", "ia3", "adapter", "prompt", "ptuning", "prefix")


def apply(params, model_cfg, peft_cfg, key, tokenizer=None):
    """(params with the method's nodes/parameters added, regex of the trainable paths).

    `full` trains everything except what `peft.freeze` matches (e.g. embeddings and the first
    layers: `^(embed|layers_[01])/`).
    """
    m = peft_cfg.method
    if m == "full":
        re.compile(peft_cfg.freeze or "")  # fail early on a bad regex
        # Everything whose path does not match `freeze` (a negative lookahead on the whole path).
        return params, f"^(?!.*(?:{peft_cfg.freeze}))" if peft_cfg.freeze else ".*"
    if m in ("lora", "dora"):
        p = lora.inject(params, key, targets=peft_cfg.targets or lora.DEFAULT_TARGETS,
                        rank=peft_cfg.rank, alpha=peft_cfg.alpha, dropout=peft_cfg.dropout,
                        init=peft_cfg.init, rslora=peft_cfg.rslora, dora=(m == "dora"))
        return p, lora.TRAINABLE
    if m == "ia3":
        return ia3.inject(params, targets=peft_cfg.targets or ia3.DEFAULT_TARGETS), ia3.TRAINABLE
    if m == "adapter":
        return adapters.inject(params, key, placement=peft_cfg.placement,
                               bottleneck=peft_cfg.bottleneck), adapters.TRAINABLE
    if m == "prompt":
        text_ids = tokenizer.encode(peft_cfg.prompt_text) if peft_cfg.prompt_text else None
        return prompts.init_prompt_tuning(params, model_cfg, key, n=peft_cfg.num_virtual,
                                          init=peft_cfg.prompt_init, text_ids=text_ids), \
            prompts.TRAINABLE
    if m == "ptuning":
        return prompts.init_ptuning(params, model_cfg, key, n=peft_cfg.num_virtual,
                                    encoder=peft_cfg.encoder,
                                    hidden=peft_cfg.encoder_hidden), prompts.TRAINABLE
    if m == "prefix":
        return prompts.init_prefix(params, model_cfg, key, n=peft_cfg.num_virtual,
                                   reparam_hidden=peft_cfg.reparam_hidden), prompts.TRAINABLE
    raise ValueError(f"peft.method: unknown method {m!r}; choose one of {METHODS}")


PTUNING_PLACEMENTS = ("template", "prepend")


def virtual_slots(peft_cfg) -> dict[str, int]:
    """Where a method's virtual tokens go, as `prompts.insert_virtual` keyword arguments.

    Why a table: prompt tuning prepends every virtual token (BOS included), as PEFT does;
    P-tuning either keeps its template (half after BOS, the rest before the completion) or, with
    `peft.ptuning_placement = "prepend"`, matches PEFT's P_TUNING and prompt tuning.
    """
    n = peft_cfg.num_virtual
    if peft_cfg.method == "prompt":
        return {"prepend": n}
    if peft_cfg.method == "ptuning":
        placement = peft_cfg.ptuning_placement
        if placement == "prepend":
            return {"prepend": n}
        if placement == "template":
            return {"after_bos": n // 2, "before_completion": n - n // 2}
        raise ValueError(f"peft.ptuning_placement: unknown placement {placement!r}; "
                         f"choose one of {PTUNING_PLACEMENTS}")
    return {}


def add_virtual_slots(example, peft_cfg):
    """An encoded `(ids, loss_mask)` example with the method's virtual-token slots inserted."""
    slots = virtual_slots(peft_cfg)
    if not any(slots.values()):
        return example
    ids, mask = example
    return prompts.insert_virtual(np.asarray(ids), np.asarray(mask, bool), **slots)


def finalize(params, peft_cfg):
    """Inference-ready params: merge mergeable adapters, drop reparameterization networks."""
    params = prompts.finalize(params)
    if peft_cfg.method in ("lora", "dora"):
        return lora.merge(params)
    if peft_cfg.method == "ia3":
        return ia3.merge(params)
    return params

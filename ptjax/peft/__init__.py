"""Parameter-efficient fine-tuning as pure transforms of the parameter pytree.

`apply` turns a base model's params into a method's params and names which paths train; the
rest of the stack (split into trainable/frozen, optimizer, checkpoints) needs nothing else.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from ptjax import nodes
from ptjax.peft import adapters, ia3, lora, prompts

@dataclasses.dataclass(frozen=True)
class Method:
    """Everything the stack knows about one fine-tuning method, in one place.

    Why one record: injection, the trainable paths, what `finalize` folds into the weights, the
    PEFT file type and the usual learning rate used to live in six tables that drifted apart.
    `inject(params, model_cfg, peft_cfg, key, tokenizer)` returns the params with the method's
    nodes or parameters added; `trainable` is a regex over paths (or a function of `peft_cfg`);
    `merges` are the node types `finalize` materializes into plain weights (empty: the method
    cannot merge); `peft_file` is `peft_format.save_adapter`'s method name (None: no PEFT file).
    """

    name: str
    inject: Callable
    trainable: str | Callable
    default_lr: float
    merges: tuple = ()
    peft_file: str | None = None

    def trainable_regex(self, peft_cfg) -> str:
        return self.trainable(peft_cfg) if callable(self.trainable) else self.trainable


def _full_trainable(peft_cfg) -> str:
    """Everything whose path does not match `peft.freeze` (a negative lookahead on the path)."""
    re.compile(peft_cfg.freeze or "")  # fail early on a bad regex
    return f"^(?!.*(?:{peft_cfg.freeze}))" if peft_cfg.freeze else ".*"


def _inject_lora(dora: bool):
    def inject(params, model_cfg, c, key, tokenizer):
        return lora.inject(params, key, targets=c.targets or lora.DEFAULT_TARGETS, rank=c.rank,
                           alpha=c.alpha, dropout=c.dropout, init=c.init, rslora=c.rslora,
                           dora=dora)
    return inject


def _inject_prompt(params, model_cfg, c, key, tokenizer):
    text_ids = tokenizer.encode(c.prompt_text) if c.prompt_text else None
    return prompts.init_prompt_tuning(params, model_cfg, key, n=c.num_virtual,
                                      init=c.prompt_init, text_ids=text_ids)


_METHOD_LIST = (
    Method("full", lambda params, *_: params, _full_trainable, 5e-4, merges=(nodes.WeightNode,)),
    Method("lora", _inject_lora(False), lora.TRAINABLE, 2e-3, (lora.LoRA,), "lora"),
    Method("dora", _inject_lora(True), lora.TRAINABLE, 2e-3, (lora.DoRA,), "dora"),
    Method("ia3", lambda params, _, c, *__: ia3.inject(params, targets=c.targets or
                                                       ia3.DEFAULT_TARGETS),
           ia3.TRAINABLE, 1e-2, (ia3.IA3,), "ia3"),
    Method("adapter", lambda params, _, c, key, __: adapters.inject(
        params, key, placement=c.placement, bottleneck=c.bottleneck), adapters.TRAINABLE, 2e-3),
    Method("prompt", _inject_prompt, prompts.TRAINABLE, 3e-2, peft_file="prompt_tuning"),
    Method("ptuning", lambda params, cfg, c, key, _: prompts.init_ptuning(
        params, cfg, key, n=c.num_virtual, encoder=c.encoder, hidden=c.encoder_hidden),
        prompts.TRAINABLE, 1e-2, peft_file="p_tuning"),
    Method("prefix", lambda params, cfg, c, key, _: prompts.init_prefix(
        params, cfg, key, n=c.num_virtual, reparam_hidden=c.reparam_hidden),
        prompts.TRAINABLE, 1e-2, peft_file="prefix_tuning"),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHOD_LIST}


def method(name: str) -> Method:
    """The registry entry of `name`, or an error naming the config key and the choices."""
    if name not in METHODS:
        raise ValueError(f"peft.method: unknown method {name!r}; choose one of {tuple(METHODS)}")
    return METHODS[name]


def apply(params, model_cfg, peft_cfg, key, tokenizer=None):
    """(params with the method's nodes/parameters added, regex of the trainable paths).

    `full` trains everything except what `peft.freeze` matches (e.g. embeddings and the first
    layers: `^(embed|layers_[01])/`).
    """
    m = method(peft_cfg.method)
    trainable = m.trainable_regex(peft_cfg)
    return m.inject(params, model_cfg, peft_cfg, key, tokenizer), trainable


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
    """Inference-ready params: drop reparameterization networks and fold the method's nodes
    into plain weights where it can merge (LoRA, DoRA, IA3; `full` folds whatever nodes remain,
    e.g. quantized weights, into arrays)."""
    params = prompts.finalize(params)
    merges = method(peft_cfg.method).merges
    return nodes.merge(params, merges) if merges else params

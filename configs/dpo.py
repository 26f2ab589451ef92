"""DPO (or IPO) on preference pairs, from a trained model.

    python launch.py --config=configs/dpo.py:peft=lora --workdir=runs/dpo \
        --config.model.init=runs/sft --config.data.train=prefs.jsonl
    python launch.py --config=configs/dpo.py --workdir=runs/dpo_full \
        --config.model.init=runs/sft --config.data.train=prefs.jsonl --config.dpo.loss_type=ipo

`data.train` is JSONL with `prompt`, `chosen`, `rejected` (strings or chat messages). With an
adapter method (`peft=lora`, also `quant=nf4`) the reference is the base with the adapters off;
with full fine-tuning the reference log-probs are computed once before training
(`dpo.reference`). Reports held-out DPO loss, reward accuracy and margin.
"""

import ml_collections

from ptjax import peft
from ptjax.train.config import base_config


def get_config(arg=None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    unknown = set(options) - {"peft", "quant"}
    if unknown:
        raise ValueError(f"configs/dpo.py: unknown option(s) {sorted(unknown)}; use peft=NAME "
                         "and quant=NAME")
    method = options.get("peft", "full")
    if method not in peft.METHODS:
        raise ValueError(f"configs/dpo.py: peft={method!r} is not one of {tuple(peft.METHODS)}")
    c = base_config()
    c.trainer = "dpo"
    c.peft.method = method
    c.optim.lr = peft.METHODS[method].default_lr / 10
    c.quant.method = options.get("quant", "")
    c.train.batch_size = 16
    c.train.steps = 200
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"  # or ipo (length-averaged log-probs)
    c.dpo.label_smoothing = 0.0  # conservative DPO
    c.dpo.reference = "auto"  # adapters_off (adapter methods) or precomputed (any method)
    c.dpo.eval_fraction = 0.1
    return c

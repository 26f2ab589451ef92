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
from ptjax.train.config import base_config, method_options


def get_config(arg=None):
    method, quant_method = method_options(arg, "configs/dpo.py")
    c = base_config()
    c.trainer = "dpo"
    c.peft.method = method
    c.optim.lr = peft.METHODS[method].default_lr / 10
    c.quant.method = quant_method
    c.train.batch_size = 16
    c.train.steps = 200
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"  # or ipo (length-averaged log-probs)
    c.dpo.label_smoothing = 0.0  # conservative DPO
    c.dpo.reference = "auto"  # adapters_off (adapter methods) or precomputed (any method)
    c.dpo.eval_fraction = 0.1
    return c

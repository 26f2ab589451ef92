"""Reward model: a scalar head on the last real token, trained on preference pairs (Bradley-Terry).

    python launch.py --config=configs/reward.py --workdir=runs/rm \
        --config.model.init=runs/sft --config.data.train=prefs.jsonl
    python launch.py --config=configs/reward.py:peft=lora --workdir=runs/rm_lora \
        --config.model.init=runs/sft --config.data.train=prefs.jsonl --config.data.eval=held.jsonl

`data.train` is JSONL with `prompt`, `chosen`, `rejected` (strings, or chat messages as in TRL's
conversational format). Without `data.eval`, `reward.eval_fraction` of the pairs is held out.
Reports held-out pairwise accuracy; WORKDIR/reward_model is the trained model (a Hugging Face
folder plus `score_head.safetensors`), which `configs/ppo.py` reads as `ppo.reward_model`.
`peft=NAME` and `quant=NAME` work as in `configs/sft.py` (the head always trains).
"""

import ml_collections

from ptjax import peft
from ptjax.train.config import base_config, method_options


def get_config(arg=None):
    method, quant_method = method_options(arg, "configs/reward.py")
    c = base_config()
    c.trainer = "reward"
    c.peft.method = method
    c.optim.lr = peft.METHODS[method].default_lr / 2
    c.quant.method = quant_method
    c.train.batch_size = 16
    c.train.steps = 300
    c.reward = reward_defaults()
    return c


def reward_defaults() -> ml_collections.ConfigDict:
    r = ml_collections.ConfigDict()
    r.center_coef = 0.0  # weight of mean((r_chosen + r_rejected)^2): keeps rewards near 0
    r.eval_fraction = 0.1  # held out when data.eval is not given
    # score += s * log p(response | prompt) under the body's LM head, s trained (from 1)
    r.likelihood = False
    return r

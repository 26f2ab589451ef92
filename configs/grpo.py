"""GRPO (or Dr. GRPO, or RLOO) with weighted reward functions, from a trained model.

    python launch.py --config=configs/grpo.py:peft=lora --workdir=runs/grpo \
        --config.model.init=runs/sft --config.grpo.prompts=prompts.jsonl \
        --config.grpo.reward_fns=my_rewards:exact,my_rewards:brevity \
        --config.grpo.reward_weights='(1.0, 0.2)'
    ... --config.grpo.estimator=rloo

`grpo.prompts` is JSONL with a `prompt` field. Each iteration samples `grpo.group_size`
completions of `train.batch_size` prompts; advantages are group-standardized (grpo), only
centered (dr_grpo) or leave-one-out (rloo). `grpo.beta > 0` adds the k3 KL to the reference
(adapters off with `peft=lora`, else a frozen copy).
"""

import ml_collections

from ptjax import peft
from ptjax.train.config import base_config, method_options


def grpo_defaults() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.prompts = ""
    g.reward_fns = ""  # comma-separated module:function(prompt, response) -> float
    g.reward_weights = ()  # one per function (default all 1)
    g.reward_model = ""  # or a configs/reward.py WORKDIR/reward_model
    g.estimator = "grpo"  # grpo, dr_grpo or rloo
    g.group_size = 8
    g.max_new_tokens = 32
    g.temperature = 1.0
    g.top_k = 0
    g.top_p = 1.0
    g.epochs = 1
    g.minibatches = 2
    g.clip_eps = 0.2
    g.beta = 0.04  # k3 KL coefficient (0: no reference)
    g.missing_eos_penalty = 0.0
    return g


def get_config(arg=None):
    method, quant_method = method_options(arg, "configs/grpo.py")
    c = base_config()
    c.trainer = "grpo"
    c.peft.method = method
    c.optim.lr = peft.METHODS[method].default_lr / 20
    c.optim.warmup_steps = 0
    c.optim.final_lr_fraction = 1.0
    c.quant.method = quant_method
    c.train.steps = 100
    c.train.batch_size = 8  # prompts per iteration
    c.checkpoint.every = 10
    c.grpo = grpo_defaults()
    return c

"""PPO with a KL penalty (InstructGPT's RL step) against a reward model or a reward function.

    python launch.py --config=configs/ppo.py --workdir=runs/ppo --config.model.init=runs/sft \
        --config.ppo.prompts=prompts.jsonl --config.ppo.reward_model=runs/rm/reward_model
    python launch.py --config=configs/ppo.py:peft=lora --workdir=runs/ppo_lora \
        --config.model.init=runs/sft --config.ppo.prompts=prompts.jsonl \
        --config.ppo.reward_fn=my_rewards:exact_answer

`ppo.prompts` is JSONL with a `prompt` field; `train.steps` is the number of iterations and
`train.batch_size` the prompts per iteration (one response each). With `peft=lora` (also with
`quant=nf4`) the reference is the base with the adapters off: one copy of the weights. The
value head sits on the policy's body; `ppo.critic=separate` trains a second, full-precision
model as the critic instead, started from the reward model as in InstructGPT. A reward
function is `module:function` taking `(prompt, response)` strings and returning a float.
"""

import ml_collections

from ptjax import peft
from ptjax.train.config import base_config, method_options


def ppo_defaults() -> ml_collections.ConfigDict:
    """PPO's knobs with the common defaults of ../shared/REFERENCE.md."""
    p = ml_collections.ConfigDict()
    p.prompts = ""  # JSONL of {"prompt": ...}
    p.reward_model = ""  # WORKDIR/reward_model of configs/reward.py
    p.reward_fn = ""  # or module:function(prompt, response) -> float
    p.max_new_tokens = 32
    p.temperature = 0.7
    p.top_k = 0
    p.top_p = 1.0
    p.epochs = 4
    p.minibatches = 2
    p.kl_coef = 0.05
    p.kl_kind = "k1"  # or k3
    p.adaptive_kl = False  # Ziegler et al.'s controller towards kl_target nats per sequence
    p.kl_target = 6.0
    p.kl_horizon = 10000
    p.gamma = 1.0
    p.lam = 0.95
    p.clip_eps = 0.2
    p.clip_eps_value = 0.2
    p.value_coef = 0.1  # shared critic: the value loss's weight in the policy step
    # "shared": a value head on the policy's body (reading it through a stop-gradient);
    # "separate": a second full model, started from ppo.reward_model when there is one
    # (InstructGPT), its body trained at critic_lr and its head at value_lr.
    p.critic = "shared"
    p.critic_lr = 1e-5
    p.value_lr = 1e-3  # the value head's own peak learning rate (it starts from random weights)
    p.entropy_coef = 0.0
    p.missing_eos_penalty = -1.0  # added to the score of responses that never emit EOS
    # > 0: before the first update, the scores of this many responses of the starting policy
    # set a bias and gain that make them mean 0, std 1 (Ziegler et al.), so kl_coef is in
    # units of the reward's spread whatever the reward model's scale; 0 = raw scores.
    p.score_normalization_samples = 0
    # > 1: before the first update, sample this many responses per prompt from the starting
    # policy and keep only the prompts whose responses are not all the same (the others give
    # every rollout one reward: no advantage to learn from); 0 = every prompt.
    p.prompt_filter_samples = 0
    return p


def get_config(arg=None):
    method, quant_method = method_options(arg, "configs/ppo.py")
    c = base_config()
    c.trainer = "ppo"
    c.peft.method = method
    c.optim.lr = peft.METHODS[method].default_lr / 20
    c.optim.warmup_steps = 0
    c.optim.final_lr_fraction = 1.0
    c.quant.method = quant_method
    c.train.steps = 100  # iterations
    c.train.batch_size = 32  # prompts per iteration
    c.checkpoint.every = 10
    c.ppo = ppo_defaults()
    return c

"""PPO, DPO and GRPO compared on the demo's tasks, from the same SFT model, in one table.

    python launch.py --config=configs/compare_alignment.py --workdir=runs/alignment
    python launch.py --config=configs/compare_alignment.py --workdir=runs/alignment \
        --config.demo.base_dir=runs/demo/base   # reuse the demo's pretrained base

The start is the demo's: base, full SFT, four sampled answers per prompt ranked by the graded
ground truth, a reward model on those rankings. Rows: PPO and GRPO against that reward model,
DPO and IPO on the ranked pairs themselves, and PPO, GRPO and RLOO with the ground truth as a
verifiable reward (`ptjax.data.synthetic:graded_reward`). Each row is
`(name, trainer, "key=value,...")`, the settings laid over the trainer's section below. Columns:
greedy accuracy (overall and per task), and over samples at temperature 1 of held-out prompts
the reward model's score, the ground-truth grade and the KL to the SFT model. Writes
WORKDIR/summary.json and WORKDIR/table.md; rerunning resumes at the first unfinished row.
"""

import ml_collections

from configs.demo import get_config as demo_config
from configs.grpo import grpo_defaults

GRADED = "ptjax.data.synthetic:graded_reward"


def get_config(arg=None):
    c = demo_config(arg)
    c.trainer = "compare_alignment"
    c.demo.stages = c.demo.stages[:1]  # the full SFT every row starts from
    rlhf = c.demo.rlhf
    c.alignment = ml_collections.ConfigDict({
        "sample_prompts": 400,
        "sample_temperature": 1.0,
        "max_new_tokens": 16,
        # The trainers' sections: PPO's is the demo's; DPO reads the reward model's pairs.
        "ppo": rlhf.ppo.to_dict(),
        "dpo": {"train": {"steps": 150, "batch_size": 32,
                          "seq_len": rlhf.reward_model.train.seq_len},
                "optim": {"lr": 1e-5, "warmup_steps": 10},
                "eval": {"every": 150, "max_batches": 8},
                "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                        "reference": "auto", "eval_fraction": 0.1}},
        # 8 prompts x 8 samples = the 64 responses of a PPO iteration
        "grpo": {"train": {"steps": 30, "batch_size": 8},
                 "optim": {"lr": 2e-5, "warmup_steps": 0, "final_lr_fraction": 1.0},
                 "grpo": grpo_defaults().to_dict() | {"max_new_tokens": 16,
                                                      "temperature": 0.7}},
    })
    c.alignment.rows = [
        ("ppo rm", "ppo", ""),
        ("grpo rm", "grpo", ""),
        ("dpo", "dpo", ""),
        ("ipo", "dpo", "dpo.loss_type=ipo,dpo.beta=0.5"),
        ("ppo graded", "ppo", f"ppo.reward_fn={GRADED}"),
        ("grpo graded", "grpo", f"grpo.reward_fns={GRADED}"),
        ("rloo graded", "grpo", f"grpo.reward_fns={GRADED},grpo.estimator=rloo"),
    ]
    return c

"""The embedded demo: pretrain a small base on noisy synthetic task text, then fine-tune it.

Needs no files or network. Run:

    python launch.py --config=configs/demo.py --workdir=runs/demo

Writes WORKDIR/summary.json with task accuracy before (base) and after (sft) fine-tuning, and
per-stage metrics.jsonl, TensorBoard events, loss.png and checkpoints under WORKDIR/<stage>.
"""

import ml_collections

from ptjax.train.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.trainer = "demo"
    c.model.preset = "demo"
    c.train.seq_len = 128
    c.train.batch_size = 32
    c.train.log_every = 25
    c.checkpoint.every = 200

    c.demo = ml_collections.ConfigDict()
    c.demo.pretrain_texts = 60000
    c.demo.noise = 0.2
    c.demo.sft_examples = 20000
    c.demo.eval_examples = 400
    c.demo.base_dir = ""  # reuse a finished base stage from another workdir ("" = WORKDIR/base)
    # Fine-tuning stages after the base: (name in summary.json, peft.method, learning rate,
    # quant.method of the base: nf4 + lora is QLoRA).
    c.demo.stages = [("sft", "full", 5e-4, ""), ("sft_lora", "lora", 2e-3, ""),
                     ("sft_qlora", "lora", 2e-3, "nf4")]
    # Per-stage overrides of train / optim / eval.
    c.demo.pretrain = ml_collections.ConfigDict({
        "train": {"steps": 300},
        "optim": {"lr": 2e-3, "warmup_steps": 100},
        "eval": {"every": 150},
    })
    c.demo.sft = ml_collections.ConfigDict({
        "train": {"steps": 100},
        "optim": {"warmup_steps": 20},
        "eval": {"every": 100},
    })
    return c

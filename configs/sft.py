"""Supervised fine-tuning on JSONL prompt/completion or chat records, fully or with a PEFT method.

    python launch.py --config=configs/sft.py --workdir=runs/sft \
        --config.data.train=train.jsonl --config.data.eval=eval.jsonl
    python launch.py --config=configs/sft.py:peft=lora --workdir=runs/sft_lora \
        --config.peft.rank=8 --config.peft.alpha=16

`peft=NAME` picks full, lora, dora, ia3, adapter, prompt, ptuning or prefix; its hyperparameters
are `--config.peft.*`. With no `data.train` it fine-tunes on the demo's generated instruction
data. Start from a Hugging Face Llama folder with `--config.model.init=PATH
--config.data.tokenizer=PATH`. At the end, WORKDIR/adapter holds the adapter in PEFT's file
format and WORKDIR/merged the merged model in Hugging Face's (for methods that merge).
"""

from ptjax.peft import METHODS
from ptjax.train.config import base_config

# Learning rates each method is usually trained with; override with --config.optim.lr.
DEFAULT_LR = {"full": 5e-4, "lora": 2e-3, "dora": 2e-3, "ia3": 1e-2, "adapter": 2e-3,
              "prompt": 3e-2, "ptuning": 1e-2, "prefix": 1e-2}


def get_config(arg=None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    unknown = set(options) - {"peft"}
    if unknown:
        raise ValueError(f"configs/sft.py: unknown option(s) {sorted(unknown)}; use peft=NAME")
    method = options.get("peft", "full")
    if method not in METHODS:
        raise ValueError(f"configs/sft.py: peft={method!r} is not one of {METHODS}")
    c = base_config()
    c.trainer = "sft"
    c.peft.method = method
    c.optim.lr = DEFAULT_LR[method]
    # P-tuning as PEFT places it, so WORKDIR/adapter runs the same in PEFT (P_TUNING).
    c.peft.ptuning_placement = "prepend"
    return c

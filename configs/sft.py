"""Supervised fine-tuning on JSONL prompt/completion or chat records.

    python launch.py --config=configs/sft.py --workdir=runs/sft \
        --config.data.train=train.jsonl --config.data.eval=eval.jsonl

With no `data.train` it fine-tunes on the demo's generated instruction data. Start from a
Hugging Face Llama folder with `--config.model.init=PATH --config.data.tokenizer=PATH`.
"""

from ptjax.train.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.trainer = "sft"
    return c

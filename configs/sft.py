"""Supervised fine-tuning on JSONL prompt/completion or chat records, fully or with a PEFT method.

    python launch.py --config=configs/sft.py --workdir=runs/sft \
        --config.data.train=train.jsonl --config.data.eval=eval.jsonl
    python launch.py --config=configs/sft.py:peft=lora --workdir=runs/sft_lora \
        --config.peft.rank=8 --config.peft.alpha=16
    python launch.py --config=configs/sft.py:peft=lora,quant=nf4 --workdir=runs/sft_qlora

`peft=NAME` picks full, lora, dora, ia3, adapter, prompt, ptuning or prefix; its hyperparameters
are `--config.peft.*`. `quant=NAME` quantizes the base first (int8, int4, fp8, nf4, fp4;
`--config.quant.*`): `configs/sft.py:peft=lora,quant=nf4` is QLoRA, and `quant=int4` with
`--config.quant.qat=True` is quantization-aware full fine-tuning. With no `data.train` it
fine-tunes on the demo's generated instruction data. Start from a Hugging Face folder, a GGUF
file or a ptjax run with `--config.model.init=PATH`. At the end, WORKDIR/adapter holds the adapter in PEFT's file
format and WORKDIR/merged the merged model in Hugging Face's (for methods that merge).
"""

from ptjax import peft
from ptjax.train.config import base_config, method_options


def get_config(arg=None):
    method, quant_method = method_options(arg, "configs/sft.py")
    c = base_config()
    c.trainer = "sft"
    c.peft.method = method
    c.optim.lr = peft.METHODS[method].default_lr  # the method's usual rate; --config.optim.lr
    c.quant.method = quant_method
    # P-tuning as PEFT places it, so WORKDIR/adapter runs the same in PEFT (P_TUNING).
    c.peft.ptuning_placement = "prepend"
    return c

"""Quantize a checkpoint and compare it with the original: perplexity on held-out text, bytes.

    python launch.py --config=configs/quantize.py:nf4 --workdir=runs/quantize_nf4 \
        --config.model.init=$(python -m ptjax.interop.fetch smollm2)
    python launch.py --config=configs/quantize.py:int4 --workdir=runs/quantize_int4 \
        --config.model.init=PATH --config.quant.granularity=group --config.quant.group_size=64
    python launch.py --config=configs/quantize.py:int4 --workdir=runs/qat_int4 \
        --config.model.init=PATH --config.quant.qat=True --config.train.steps=20

`:METHOD` is int8, int4, fp8, nf4 (double-quantized unless --config.quant.double_quant=False) or
fp4; the other `--config.quant.*` keys set scales and targets. `model.init` is a Hugging Face
folder, a GGUF file or a ptjax run. With `quant.qat=True` the model is first fine-tuned with
fake quantization on the calibration text (`train.*`, `optim.*`), then converted. Perplexity is
measured on `pydoc_data.topics` (or `--config.compress.text=FILE`, .txt or SFT JSONL): the last
`compress.eval_rows` rows of `compress.seq_len` tokens. WORKDIR/model is the quantized model as a
Hugging Face folder (NF4/FP4 in bitsandbytes' 4-bit format); WORKDIR/summary.json and
WORKDIR/table.md compare it with the original.
"""

import ml_collections

from ptjax.quant import METHODS
from ptjax.train.config import base_config


def get_config(arg=None):
    method = arg or "nf4"
    if method not in METHODS[1:]:
        raise ValueError(f"configs/quantize.py: {method!r} is not one of {METHODS[1:]}")
    c = base_config()
    c.trainer = "compress"
    c.quant.method = method
    c.compress = ml_collections.ConfigDict({"name": method, "text": "", "seq_len": 512,
                                            "eval_rows": 32})
    c.prune.calibration_rows = 64  # also the QAT fine-tune's data
    # QAT only: a short, gentle fine-tune of a pretrained model.
    c.train.update(steps=20, batch_size=4, log_every=5)
    c.optim.update(lr=1e-5, warmup_steps=2, weight_decay=0.0)
    c.eval.every = 0
    c.checkpoint.every = 10
    return c

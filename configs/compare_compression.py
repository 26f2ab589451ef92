"""Quantization and pruning side by side: bytes, perplexity and task accuracy per method.

    python launch.py --config=configs/compare_compression.py --workdir=runs/compression
    python launch.py --config=configs/compare_compression.py --workdir=runs/compression \
        --config.model.init=$(python -m ptjax.interop.fetch smollm2)

Rows: dense, int8 (per channel), int4 (groups of 64), NF4, NF4 with double quantization, QAT
int4 (a short fake-quantized fine-tune, then converted), 50% magnitude (per output row), 50%
Wanda, 50% SparseGPT, 2:4 Wanda, 2:4 SparseGPT. Subject 1 is the demo's fully fine-tuned model
(trained here, or reuse a base with `--config.demo.base_dir=runs/demo/base`): task accuracy,
perplexity on held-out instruction text. Subject 2, with `model.init` (SmolLM2-135M-Instruct in the
README): perplexity on `pydoc_data.topics`, the first 64 x 512 tokens calibrating, the last
32 x 512 evaluating. Writes WORKDIR/summary.json ("demo" and "model" tables) and WORKDIR/table.md;
rerunning resumes at the first unfinished row.
"""

import ml_collections

from configs.demo import get_config as demo_config


def get_config(arg=None):
    c = demo_config(arg)
    c.trainer = "compare_compression"
    c.prune.calibration_rows = 64
    c.compress = ml_collections.ConfigDict({
        "text": "",  # the real model's text: "" = pydoc_data.topics, or a .txt / SFT JSONL file
        "seq_len": 512,
        "eval_rows": 32,
        # Settings laid over every variant of one subject (the QAT fine-tune, group sizes).
        "demo_settings": "train.steps=60,optim.lr=1e-4,optim.warmup_steps=5,eval.every=0",
        "model_settings": "train.steps=16,train.batch_size=4,optim.lr=1e-5,"
                          "optim.warmup_steps=2,optim.weight_decay=0.0,eval.every=0",
    })
    int4 = "quant.method=int4,quant.granularity=group,quant.group_size=64"
    c.compress.variants = [
        ("dense", ""),
        ("int8", "quant.method=int8"),
        ("int4 g64", int4),
        ("nf4", "quant.method=nf4,quant.double_quant=False"),
        ("nf4+dq", "quant.method=nf4"),
        ("qat int4 g64", int4 + ",quant.qat=True"),
        ("50% magnitude", "prune.method=magnitude,prune.structure=row"),
        ("50% wanda", "prune.method=wanda"),
        ("50% sparsegpt", "prune.method=sparsegpt"),
        ("2:4 wanda", "prune.method=wanda,prune.structure=2:4"),
        ("2:4 sparsegpt", "prune.method=sparsegpt,prune.structure=2:4"),
    ]
    return c

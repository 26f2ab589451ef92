"""Prune a checkpoint (one-shot or gradually while fine-tuning) and compare it with the dense one.

    python launch.py --config=configs/prune.py:wanda --workdir=runs/prune_wanda \
        --config.model.init=$(python -m ptjax.interop.fetch smollm2)
    python launch.py --config=configs/prune.py:sparsegpt --workdir=runs/prune_sparsegpt_24 \
        --config.model.init=PATH --config.prune.structure=2:4
    python launch.py --config=configs/prune.py:magnitude --workdir=runs/prune_gradual \
        --config.model.init=PATH --config.prune.end_step=40 --config.prune.every=5 \
        --config.train.steps=50

`:METHOD` is magnitude, global, random, wanda or sparsegpt; `--config.prune.sparsity` (default
0.5), `--config.prune.structure` ("2:4", or "row" for magnitude per output) and
`--config.prune.targets` shape it. One-shot by default; with `prune.end_step` > 0 the model is
fine-tuned on the calibration text while the masks follow Zhu & Gupta's cubic schedule from
`prune.initial_sparsity` at `prune.start_step` to `prune.sparsity` at `prune.end_step`, updated
every `prune.every` steps. Calibration (Wanda, SparseGPT, and the gradual fine-tune) uses the
first `prune.calibration_rows` rows of `compress.seq_len` tokens of `pydoc_data.topics` (or
`--config.compress.text=FILE`); perplexity the last `compress.eval_rows`. WORKDIR/model is the
pruned model as a Hugging Face folder; WORKDIR/summary.json and WORKDIR/table.md compare it with
the dense one, with the sparsity of every layer.
"""

import ml_collections

from ptjax.prune import CRITERIA
from ptjax.train.config import base_config


def get_config(arg=None):
    method = arg or "wanda"
    if method not in CRITERIA[1:]:
        raise ValueError(f"configs/prune.py: {method!r} is not one of {CRITERIA[1:]}")
    c = base_config()
    c.trainer = "compress"
    c.prune.method = method
    c.compress = ml_collections.ConfigDict({"name": method, "text": "", "seq_len": 512,
                                            "eval_rows": 32})
    c.prune.calibration_rows = 64
    # Gradual pruning only: the fine-tune the masks are updated in.
    c.train.update(steps=50, batch_size=4, log_every=5)
    c.optim.update(lr=1e-5, warmup_steps=2, weight_decay=0.0)
    c.eval.every = 0
    c.checkpoint.every = 10
    return c

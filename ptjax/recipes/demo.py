"""The embedded demo: pretrain a small base on noisy task text, fine-tune it, measure accuracy.

No files or network: the data comes from `ptjax.data.synthetic`, whose tasks (addition,
reversal, sorting, counting) have a programmatic ground truth. The base model sees the skills in
a raw surface form ("12+7=19"); fine-tuning teaches the instruction format ("Q: 12+7\nA: ").
Accuracy is exact match of greedy completions. Each stage has its own workdir, checkpoints and
metrics; rerunning the command resumes the stage in progress and skips finished ones.
"""

from __future__ import annotations

import os
import time

import ml_collections

from ptjax import data as D
from ptjax import sampling
from ptjax.train import trainer


def stage_config(config, stage: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The demo config with one stage's `train`/`optim`/`eval` settings laid over it."""
    c = ml_collections.ConfigDict(config.to_dict())
    for section in ("train", "optim", "eval"):
        if section in stage:
            c[section].update(stage[section].to_dict())
    return c


def accuracy(params, model_cfg, tokenizer, eval_items) -> dict:
    """Exact-match accuracy of greedy completions, overall and per task."""
    prompts = [prompt for _, prompt, _ in eval_items]
    answers = [answer for _, _, answer in eval_items]
    preds = sampling.generate_text(params, model_cfg, tokenizer, prompts, max_new_tokens=16)
    result = {"accuracy": D.score(answers, preds)}
    for task in sorted({t for t, _, _ in eval_items}):
        idx = [i for i, (t, _, _) in enumerate(eval_items) if t == task]
        result[f"accuracy_{task}"] = D.score([answers[i] for i in idx], [preds[i] for i in idx])
    return result


def run(config, workdir: str) -> dict:
    """Run every demo stage and write WORKDIR/summary.json; returns the summary."""
    started = time.time()
    tokenizer = D.load_tokenizer(config.data.tokenizer)
    seq_len = config.train.seq_len
    d = config.demo
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    stages = summary.setdefault("stages", {})
    eval_items = D.eval_set(d.eval_examples, config.seed + 1000)

    def encode(records):
        return [D.encode_sft(r, tokenizer, seq_len) for r in records]

    # Stage 1: the base model, pretrained from scratch on noisy raw task text.
    pretrain = [D.SFTRecord(prompt="", completion=t)
                for t in D.pretraining_texts(d.pretrain_texts, config.seed, noise=d.noise)]
    held_out = [D.SFTRecord(prompt="", completion=t)
                for t in D.pretraining_texts(200, config.seed + 1, noise=d.noise)]
    base = trainer.train(stage_config(config, d.pretrain), os.path.join(workdir, "base"),
                         encode(pretrain), encode(held_out))
    stages["base"] = {"eval_loss": float(base.metrics["eval/loss"]),
                      **accuracy(base.params, base.model_cfg, tokenizer, eval_items)}
    trainer.write_summary(summary_path, summary)

    # Stage 2: full supervised fine-tuning on clean instruction pairs.
    sft_train = encode(D.instruction_records(d.sft_examples, config.seed + 2))
    sft_eval = encode(D.instruction_records(300, config.seed + 3))
    sft = trainer.train(stage_config(config, d.sft), os.path.join(workdir, "sft"),
                        sft_train, sft_eval, init_params=base.params)
    stages["sft"] = {"eval_loss": float(sft.metrics["eval/loss"]),
                     **accuracy(sft.params, sft.model_cfg, tokenizer, eval_items)}
    summary["seconds"] = round(time.time() - started, 1)
    trainer.write_summary(summary_path, summary)
    print_table(summary)
    return summary


def print_table(summary: dict):
    """The summary as a small table on stdout."""
    rows = summary["stages"]
    keys = sorted({k for v in rows.values() for k in v})
    print(f"{'stage':<10}" + "".join(f"{k:>18}" for k in keys))
    for name, values in rows.items():
        print(f"{name:<10}" + "".join(
            f"{values[k]:>18.4f}" if k in values else f"{'':>18}" for k in keys))

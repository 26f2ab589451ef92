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
import numpy as np

from ptjax import data as D
from ptjax import peft, sampling
from ptjax import tree as ptree
from ptjax.train import trainer


def stage_config(config, stage: ml_collections.ConfigDict, quant_method: str = "",
                 **peft_overrides) -> ml_collections.ConfigDict:
    """The demo config with one stage's sections (`train`, `optim`, `eval`, or a trainer's own
    such as `ppo`), PEFT method and quantization of the base laid over it."""
    c = ml_collections.ConfigDict(config.to_dict())
    for name, values in stage.items():
        if name in c and isinstance(c[name], ml_collections.ConfigDict):
            c[name].update(values.to_dict())
        else:
            c[name] = values
    c.peft.update(peft_overrides)
    c.quant.method = quant_method
    return c


def accuracy(params, model_cfg, tokenizer, eval_items, peft_cfg) -> dict:
    """Exact-match accuracy of greedy completions, overall and per task."""
    prompts = [D.encode_prompt(prompt, tokenizer) for _, prompt, _ in eval_items]
    encoded = [peft.add_virtual_slots((ids, np.zeros(len(ids), bool)), peft_cfg)[0]
               for ids in prompts]
    preds = sampling.generate_from_ids(params, model_cfg, tokenizer, encoded, max_new_tokens=16)
    answers = [answer for _, _, answer in eval_items]
    result = {"accuracy": D.score(answers, preds)}
    for task in sorted({t for t, _, _ in eval_items}):
        idx = [i for i, (t, _, _) in enumerate(eval_items) if t == task]
        result[f"accuracy_{task}"] = D.score([answers[i] for i in idx], [preds[i] for i in idx])
    return result


def encode(records, tokenizer, seq_len):
    return [D.encode_sft(r, tokenizer, seq_len) for r in records]


def pretrain_base(config, workdir: str, tokenizer) -> trainer.Result:
    """Stage 1: the base model, pretrained from scratch on noisy raw task text (loss on all of it)."""
    d, seq_len = config.demo, config.train.seq_len
    texts = D.pretraining_texts(d.pretrain_texts, config.seed, noise=d.noise)
    held_out = D.pretraining_texts(200, config.seed + 1, noise=d.noise)
    stage = stage_config(config, d.pretrain, method="full")
    if d.base_dir:
        # A base another recipe of the demo family (demo, compare_alignment,
        # compare_compression) wrote: the same stage under another `trainer` name, which the
        # resume guard would otherwise refuse.
        stage.checkpoint.allow_changes = ",".join(
            a for a in (stage.checkpoint.allow_changes, "trainer") if a)
    return trainer.train(stage, d.base_dir or os.path.join(workdir, "base"),
                         encode([D.SFTRecord("", t) for t in texts], tokenizer, seq_len),
                         encode([D.SFTRecord("", t) for t in held_out], tokenizer, seq_len))


def finetune(config, workdir: str, name: str, base: trainer.Result, tokenizer, eval_items,
             lr: float, quant_method: str = "", **peft_overrides):
    """One fine-tuning stage from the base on clean instruction pairs (the base quantized first
    when `quant_method` is set: nf4 + lora is QLoRA); returns (its summary row, the inference
    params and model config)."""
    d, seq_len = config.demo, config.train.seq_len
    c = stage_config(config, d.sft, quant_method, **peft_overrides)
    c.optim.lr = lr
    started = time.time()
    result = trainer.train(c, os.path.join(workdir, name),
                           encode(D.instruction_records(d.sft_examples, config.seed + 2), tokenizer,
                                  seq_len),
                           encode(D.instruction_records(300, config.seed + 3), tokenizer, seq_len),
                           init_params=base.params)
    inference_params = peft.finalize(result.params, c.peft)
    row = {"eval_loss": float(result.metrics["eval/loss"]),
            "parameter_bytes": ptree.nbytes(result.params),
            "trainable_params": result.trainable_params,
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "train_tokens_per_s": float(result.metrics.get("train/tokens_per_s", 0.0)),
            "stage_seconds": round(time.time() - started, 1),
            **accuracy(inference_params, result.model_cfg, tokenizer, eval_items, c.peft)}
    return row, trainer.Result(params=inference_params, model_cfg=result.model_cfg,
                               metrics=result.metrics)


def run(config, workdir: str) -> dict:
    """Run every demo stage and write WORKDIR/summary.json; returns the summary."""
    started = time.time()
    tokenizer = D.load_tokenizer(config.data.tokenizer)
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    stages = summary.setdefault("stages", {})
    eval_items = D.eval_set(config.demo.eval_examples, config.seed + 1000)

    base = pretrain_base(config, workdir, tokenizer)
    stages["base"] = {"eval_loss": float(base.metrics["eval/loss"]),
                      **accuracy(base.params, base.model_cfg, tokenizer, eval_items, config.peft)}
    trainer.write_summary(summary_path, summary)
    tuned = {}
    for name, method, lr, quant_method in config.demo.stages:
        stages[name], tuned[name] = finetune(config, workdir, name, base, tokenizer, eval_items,
                                             lr, quant_method, method=method)
        trainer.write_summary(summary_path, summary)
    if config.demo.rlhf.after:  # InstructGPT's next steps: rankings, a reward model, PPO
        from ptjax.recipes import demo_rlhf

        stages["reward_model"], stages["ppo"] = demo_rlhf.run(
            config, workdir, tuned[config.demo.rlhf.after], tokenizer, eval_items,
            lambda params, cfg: accuracy(params, cfg, tokenizer, eval_items, config.peft))
        trainer.write_summary(summary_path, summary)
    summary["seconds"] = round(time.time() - started, 1)
    trainer.write_summary(summary_path, summary)
    print_table(summary, workdir)
    return summary


COLUMNS = ("accuracy", "eval_loss", "parameter_bytes", "trainable_params",
           "optimizer_state_bytes", "train_tokens_per_s")


def markdown_table(summary: dict) -> str:
    """The stages as a Markdown table (the README's and WORKDIR/table.md's format)."""
    lines = ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, values in summary["stages"].items():
        cells = []
        for k in COLUMNS:
            v = values.get(k)
            cells.append("" if v is None else f"{v:,.0f}" if k != "accuracy" and k != "eval_loss"
                         else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(summary: dict, workdir: str | None = None):
    """Print the stage table, and keep it as WORKDIR/table.md."""
    table = markdown_table(summary)
    print(table)
    if workdir:
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write(table + "\n")

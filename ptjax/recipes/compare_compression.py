"""Every quantization and pruning method side by side, on the demo model and on a real one.

Subject 1, the demo: the demo's base is pretrained and fully fine-tuned on the instruction task
(`ptjax.recipes.demo`, reusing `demo.base_dir` when given), then each variant of
`compress.variants` is applied to the fine-tuned weights and measured by task accuracy (exact
match of greedy answers), perplexity of the held-out answers and stored bytes. Subject 2,
when `model.init` names a checkpoint (SmolLM2-135M-Instruct's GGUF in the README): the same
variants measured by perplexity on `pydoc_data.topics` (`ptjax.recipes.compress`).

Rows are written to WORKDIR/summary.json as they finish; rerunning the command skips finished rows
(and finished demo stages), so a killed comparison resumes.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from ptjax import data as D
from ptjax import peft
from ptjax import tree as ptree
from ptjax.recipes import compress, demo
from ptjax.train import trainer


def demo_subject(config, workdir: str):
    """(fine-tuned params, model config, tokenizer, train examples, eval items, calibration rows,
    evaluation rows) of the demo task."""
    tokenizer = D.load_tokenizer(config.data.tokenizer)
    d, seq_len = config.demo, config.train.seq_len
    base = demo.pretrain_base(config, workdir, tokenizer)
    c = demo.stage_config(config, d.sft, method="full")
    train_examples = demo.encode(D.instruction_records(d.sft_examples, config.seed + 2), tokenizer,
                                 seq_len)
    held_out = demo.encode(D.instruction_records(300, config.seed + 3), tokenizer, seq_len)
    result = trainer.train(c, os.path.join(workdir, "sft"), train_examples, held_out,
                           init_params=base.params)
    params = ptree.to_host(peft.finalize(result.params, c.peft))
    calibration = compress_rows(train_examples, seq_len, config.prune.calibration_rows)[0]
    evaluation = compress_rows(held_out, seq_len, config.compress.eval_rows)  # completions only
    eval_items = D.eval_set(d.eval_examples, config.seed + 1000)
    return params, result.model_cfg, tokenizer, train_examples, eval_items, calibration, evaluation


def compress_rows(examples, seq_len: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """([rows, seq_len] token ids, the same shape of loss-mask weights) of the examples
    concatenated (an error names the shortfall): perplexity over the completions, the tokens
    fine-tuning taught."""
    ids = np.concatenate([np.asarray(ids, np.int32) for ids, _ in examples])
    mask = np.concatenate([np.asarray(m, bool) for _, m in examples])
    source = "the demo's instruction data"
    return (compress.split_rows(ids, seq_len, rows, 0, source)[0],
            compress.split_rows(mask, seq_len, rows, 0, source)[0])


def run(config, workdir: str) -> dict:
    """Both subjects' tables in WORKDIR/summary.json (keys "demo" and "model") and table.md."""
    started = time.time()
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    cc = config.compress

    def save(subject):
        def on_row(rows):
            summary[subject] = rows
            trainer.write_summary(summary_path, summary)  # process 0 writes it
        return on_row

    params, cfg, tokenizer, train_examples, eval_items, calibration, evaluation = demo_subject(
        config, workdir)
    variants = [(name, ",".join(filter(None, [overrides, cc.demo_settings])))
                for name, overrides in cc.variants]
    accuracy = lambda p: demo.accuracy(p, cfg, tokenizer, eval_items, config.peft)  # noqa: E731
    summary["demo"] = compress.compare(config, os.path.join(workdir, "demo_variants"), params, cfg,
                                       variants, calibration, evaluation, accuracy, train_examples,
                                       tokenizer, summary.get("demo"), save("demo"))

    if config.model.init:
        from ptjax.recipes import sft

        real = ml_collections.ConfigDict(config.to_dict())
        real.model.preset = ""  # the demo's preset names subject 1; the checkpoint is its own
        cfg, params, tokenizer, _ = sft.load_base(real)
        ids = compress.text_ids(cc.text, tokenizer)
        calibration, evaluation = compress.split_rows(ids, cc.seq_len, config.prune.calibration_rows,
                                                      cc.eval_rows, cc.text or "pydoc_data.topics")
        variants = [(name, ",".join(filter(None, [overrides, cc.model_settings])))
                    for name, overrides in cc.variants]
        summary["model"] = compress.compare(config, os.path.join(workdir, "model_variants"),
                                            params, cfg, variants, calibration, evaluation,
                                            tokenizer=tokenizer, done=summary.get("model"),
                                            on_row=save("model"))
        summary["model_init"] = config.model.init
    summary["seconds"] = round(time.time() - started, 1) + summary.get("seconds", 0.0)
    if jax.process_index() == 0:
        trainer.write_summary(summary_path, summary)
        tables = [f"## {subject}\n\n" + compress.markdown_table(summary[subject])
                  for subject in ("demo", "model") if subject in summary]
        text = "\n\n".join(tables)
        print(text)
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write(text + "\n")
    return summary

"""Compress a model (quantize, prune, or both) and measure what it costs and what it saves.

One row per variant: the variant's settings laid over the run config (`"quant.method=int8"`,
`"prune.method=wanda,prune.structure=2:4"`), applied to the same starting weights, then measured
the same way: perplexity on held-out text, parameter bytes as stored, overall sparsity, and (for
the demo model) task accuracy. Variants that need training (`quant.qat`, gradual pruning) run a
short fine-tune through the trainer first; QAT models are then converted to real storage.

Text: the Python documentation topics that ship with every Python (`pydoc_data.topics`, joined
by "\\n\\n" in sorted-key order, no BOS), or a `.txt` / SFT JSONL file named by
`compress.text`. The first `prune.calibration_rows` rows of `compress.seq_len` tokens calibrate
(Wanda, SparseGPT) and train the QAT / gradual variants; the last `compress.eval_rows` rows
evaluate. Every variant sees the same rows.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ptjax import prune, quant
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.train import trainer
from ptjax.train.config import with_overrides


def text_ids(source: str, tokenizer) -> np.ndarray:
    """Token ids of the evaluation text: "" = `pydoc_data.topics`; a `.txt` file; or an SFT
    JSONL file (each record's prompt and completion, records joined by blank lines)."""
    if not source:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"compress.text: {source}: no such file")
    elif source.endswith(".jsonl"):
        from ptjax import data as D

        text = "\n\n".join(_record_text(r) for r in D.read_sft_jsonl(source))
    else:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    return np.asarray(tokenizer.encode(text), np.int32)


def _record_text(record) -> str:
    if hasattr(record, "messages"):
        return "\n".join(content for _, content in record.messages)
    return record.prompt + record.completion


def split_rows(ids: np.ndarray, seq_len: int, calibration_rows: int, eval_rows: int,
               source: str = "the text"):
    """(calibration [c, seq], evaluation [e, seq]): the first and the last rows of `ids`, never
    overlapping (an error names the shortfall)."""
    need = (calibration_rows + eval_rows) * seq_len
    if ids.size < need:
        raise ValueError(f"compress.text: {source} has {ids.size} tokens; "
                         f"{calibration_rows} calibration + {eval_rows} evaluation rows of "
                         f"{seq_len} need {need}")
    calibration = ids[:calibration_rows * seq_len].reshape(calibration_rows, seq_len)
    evaluation = ids[ids.size - eval_rows * seq_len:].reshape(eval_rows, seq_len)
    return calibration, evaluation


def perplexity(params, model_cfg, rows: np.ndarray, batch: int = 4,
               weights: np.ndarray | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over `rows` [n, seq]: every token after the
    first of each row, or those where `weights` [n, seq] is true (e.g. only completions).
    Float32 log-softmax, summed in float64 on the host."""
    if weights is None:
        weights = np.ones(rows.shape, bool)

    @jax.jit
    def nll_sum(params, x, w):
        logits = llama.forward(params, model_cfg, x)[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(w[:, 1:], nll, 0.0))

    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        x = jnp.asarray(rows[start:start + batch], jnp.int32)
        w = np.asarray(weights[start:start + batch], bool)
        total += float(nll_sum(params, x, w))
        count += int(w[:, 1:].sum())
    return math.exp(total / count)


def stored_bytes(params) -> int:
    """Parameter bytes as the model is stored and exported: quantized nodes by their codes,
    scales and offsets; a pruned weight by its weight alone (its mask is where the stored weight
    is zero, and exports write no mask)."""
    without_masks = jax.tree.map(lambda n: n.base if isinstance(n, prune.Masked) else n, params,
                                 is_leaf=lambda n: isinstance(n, prune.Masked))
    return ptree.nbytes(without_masks)


def needs_training(c) -> bool:
    """QAT and gradual pruning change weights by fine-tuning; everything else is one-shot."""
    return bool(c.quant.qat and c.quant.method) or prune.is_gradual(c.prune)


def compress(c, params, model_cfg, calibration: np.ndarray, workdir: str, train_examples=None,
             tokenizer=None):
    """The variant `c` applied to `params`: pruning, then quantization (one-shot), or a short
    fine-tune through the trainer (QAT, gradual pruning) on `train_examples` (default: the
    calibration rows as language-modeling examples), converted to real storage after QAT."""
    if not needs_training(c):
        pruned = prune.apply(params, c.prune, model_cfg, calibration)
        return quant.apply(pruned, c.quant)
    if train_examples is None:
        train_examples = [(row, np.ones(row.shape, bool)) for row in calibration]
    c = ml_collections.ConfigDict(c.to_dict())
    c.peft.method = "full"
    c.train.seq_len = calibration.shape[1]
    result = trainer.train(c, workdir, train_examples, init_params=params, model_cfg=model_cfg,
                           tokenizer=tokenizer, show_progress=False)
    return quant.convert(ptree.to_host(result.params))


def measure(params, model_cfg, evaluation, accuracy_fn=None) -> dict:
    """Perplexity on the evaluation rows (an array, or `(rows, weights)` to count only some
    tokens), stored bytes, overall sparsity, and task accuracy when `accuracy_fn(params)` is
    given."""
    rows, weights = evaluation if isinstance(evaluation, tuple) else (evaluation, None)
    row = {"perplexity": perplexity(params, model_cfg, rows, weights=weights),
           "parameter_bytes": stored_bytes(params),
           "sparsity": prune.report(params)["overall"]}
    if accuracy_fn is not None:
        row["accuracy"] = accuracy_fn(params)["accuracy"]
    return row


def compare(config, workdir: str, params, model_cfg, variants, calibration, evaluation,
            accuracy_fn=None, train_examples=None, tokenizer=None, done: dict | None = None,
            on_row=None) -> dict:
    """name -> measured row for every `(name, overrides)` variant of `params`; rows already in
    `done` (a resumed run) are kept, and `on_row(rows)` is called after each new one."""
    rows = dict(done or {})
    for name, overrides in variants:
        if name in rows:
            continue
        started = time.time()
        c = with_overrides(config, overrides, f"compress variant {name!r}")
        compressed = compress(c, params, model_cfg, calibration,
                              os.path.join(workdir, name.replace(" ", "_").replace(":", "-")),
                              train_examples, tokenizer)
        rows[name] = {**measure(compressed, model_cfg, evaluation, accuracy_fn),
                      "seconds": round(time.time() - started, 1)}
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[name].items()), flush=True)
        if on_row:
            on_row(rows)
    return {name: rows[name] for name, _ in variants}  # in the variants' order


COLUMNS = ("parameter_bytes", "sparsity", "perplexity", "accuracy", "seconds")


def markdown_table(rows: dict) -> str:
    """Variant rows as a Markdown table (README and WORKDIR/table.md)."""
    columns = [k for k in COLUMNS if any(k in r for r in rows.values())]
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for k in columns:
            v = r.get(k)
            cells.append("" if v is None else f"{v:,.0f}" if k == "parameter_bytes"
                         else f"{v:.1f}" if k == "seconds" else f"{v:.3f}" if k != "perplexity"
                         else f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config, workdir: str) -> dict:
    """Compress `model.init` by the config's quant/prune settings, compare it with the original
    (perplexity, bytes, sparsity), save it as a Hugging Face folder in WORKDIR/model, and write
    WORKDIR/summary.json and WORKDIR/table.md."""
    from ptjax.interop import export as export_lib
    from ptjax.recipes import sft

    if not config.model.init:
        raise ValueError("model.init: compression needs a model to start from (a Hugging Face "
                         "folder, a .gguf file or a ptjax run directory)")
    model_cfg, params, tokenizer, generation = sft.load_base(config)
    cc = config.compress
    ids = text_ids(cc.text, tokenizer)
    calibration, evaluation = split_rows(ids, cc.seq_len, config.prune.calibration_rows,
                                         cc.eval_rows, cc.text or "pydoc_data.topics")
    summary_path = os.path.join(workdir, "summary.json")
    started = time.time()
    dense = {"dense": {**measure(params, model_cfg, evaluation),
                       "seconds": round(time.time() - started, 1)}}
    started = time.time()
    compressed = compress(config, params, model_cfg, calibration, os.path.join(workdir, "train"),
                          tokenizer=tokenizer)
    rows = {**dense, cc.name: {**measure(compressed, model_cfg, evaluation),
                               "seconds": round(time.time() - started, 1)}}
    compressed = ptree.to_host(compressed)  # every process takes part; process 0 writes
    if jax.process_index() == 0:
        export_lib.save_hf(compressed, model_cfg, tokenizer,
                           os.path.join(workdir, "model"), generation=generation)
    summary = {"rows": rows, "model": config.model.init, "text": cc.text or "pydoc_data.topics",
               "calibration_rows": int(calibration.shape[0]), "eval_rows": int(evaluation.shape[0]),
               "seq_len": cc.seq_len, "report": prune.report(compressed)["layers"]}
    trainer.write_summary(summary_path, summary)
    table = markdown_table(rows)
    print(table)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    return summary

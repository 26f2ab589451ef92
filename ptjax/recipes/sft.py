"""Supervised fine-tuning from JSONL (or the demo's generated task data when no path is given)."""

from __future__ import annotations

import os

import jax

from ptjax import data as D
from ptjax.train import trainer


def load_examples(path: str, tokenizer, seq_len: int, truncate: str = "left",
                  lazy: bool = False):
    """Read and encode an SFT JSONL file (errors name the file, line and field).

    Over-long examples are cut from the left or dropped (`truncate`, `data.truncate`), and the
    run says how many, naming the first few by file and line; a file left with no example fails.
    `lazy`: every record is still read and validated (a bad line fails every process before
    training), but each is tokenized only when its row stream first packs it
    (`D.LazyExamples`), so a process of a multi-process run tokenizes only its share; there is
    then no truncation report, and a dropped example stays as an empty one.
    """
    from ptjax.data import truncate as truncation

    truncation.check_policy(truncate)
    if lazy:
        records = [record for _, record in D.read_sft_jsonl_lines(path)]
        return D.LazyExamples(len(records), lambda i: D.encode_sft_status(
            records[i], tokenizer, seq_len, truncate)[0])
    return truncation.encode_file(
        path, D.read_sft_jsonl_lines(path),
        lambda r: D.encode_sft_status(r, tokenizer, seq_len, truncate), seq_len, truncate)


def demo_examples(tokenizer, seq_len: int, n: int, seed: int):
    """The demo's clean instruction pairs, encoded like JSONL records would be."""
    return [D.encode_sft(r, tokenizer, seq_len) for r in D.instruction_records(n, seed)]


def export(config, workdir: str, result: trainer.Result, tokenizer, generation: dict | None = None):
    """Write the trained adapter in PEFT's format (WORKDIR/adapter) and, for methods that merge
    into the weights (full, LoRA, DoRA, IA3), the merged model as a Hugging Face folder with its
    tokenizer and generation config (WORKDIR/merged), which transformers loads as is."""
    import jax

    from ptjax import peft
    from ptjax import tree as ptree
    from ptjax.interop import export as export_lib
    from ptjax.interop import peft_format

    params = ptree.to_host(result.params)  # every process takes part; process 0 writes
    if jax.process_index() != 0:
        return
    method = config.peft.method
    entry = peft.method(method)
    if method == "ptuning" and config.peft.ptuning_placement != "prepend":
        print(f"sft: no PEFT adapter written: PEFT's P_TUNING prepends every virtual token, and "
              f"this run placed them as {config.peft.ptuning_placement!r} "
              "(train with --config.peft.ptuning_placement=prepend to export)")
    elif entry.peft_file:
        peft_format.save_adapter(params, result.model_cfg, os.path.join(workdir, "adapter"),
                                 method=entry.peft_file, use_rslora=config.peft.rslora,
                                 base_model_name_or_path=config.model.init)
    if entry.merges:
        merged = jax.device_get(peft.finalize(params, config.peft))
        export_lib.save_hf(merged, result.model_cfg, tokenizer, os.path.join(workdir, "merged"),
                           generation=generation)


def load_base(config):
    """(model config, host params or None, tokenizer, generation defaults) a run starts from.

    With `model.init` the checkpoint decides the model (and, unless `data.tokenizer` names another
    one, the tokenizer); otherwise `model.preset` and random weights.
    """
    if not config.model.init:
        return trainer.model_config(config), None, D.load_tokenizer(config.data.tokenizer), None
    from ptjax.interop import load

    base = load.load(config.model.init)
    cfg = trainer.model_config(config, base.config)
    tokenizer = D.load_tokenizer(config.data.tokenizer) if config.data.tokenizer else base.tokenizer
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"data.tokenizer: {tokenizer.vocab_size} tokens, but the model "
                         f"({config.model.init}) has only {cfg.vocab_size} embedding rows")
    return cfg, base.params, tokenizer, base.generation


def run(config, workdir: str) -> trainer.Result:
    """Fine-tune the model of `model.init` (or `model.preset`) on `data.train`, evaluating on
    `data.eval`; with no `data.train`, on the demo's generated instruction data."""
    model_cfg, init_params, tokenizer, generation = load_base(config)
    seq_len = config.train.seq_len
    # Several processes with row streams: each tokenizes only the examples of its streams.
    lazy = config.data.streams > 1 and jax.process_count() > 1
    if config.data.train:
        train_examples = load_examples(config.data.train, tokenizer, seq_len, config.data.truncate,
                                       lazy)
    else:
        train_examples = demo_examples(tokenizer, seq_len, 20000, config.seed)
    if config.data.eval:
        eval_examples = load_examples(config.data.eval, tokenizer, seq_len, config.data.truncate,
                                      lazy)
    elif not config.data.train:
        eval_examples = demo_examples(tokenizer, seq_len, 500, config.seed + 1)
    else:
        eval_examples = []
    result = trainer.train(config, workdir, train_examples, eval_examples, init_params=init_params,
                           model_cfg=model_cfg, tokenizer=tokenizer)
    if isinstance(train_examples, D.LazyExamples):
        print(f"process {jax.process_index()}: tokenized {train_examples.encoded} of "
              f"{len(train_examples)} training examples (data.streams={config.data.streams})",
              flush=True)
    from ptjax.train import failures

    with failures.writing("export", workdir):
        export(config, workdir, result, tokenizer, generation)
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    summary.setdefault("stages", {})["sft"] = {
        "trainable_params": result.trainable_params,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        **{k.replace("/", "_"): float(v) for k, v in result.metrics.items()
           if k.startswith("eval/")}}
    trainer.write_summary(summary_path, summary)
    return result

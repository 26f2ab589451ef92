"""Supervised fine-tuning from JSONL (or the demo's generated task data when no path is given)."""

from __future__ import annotations

import os

from ptjax import data as D
from ptjax.train import trainer


def load_examples(path: str, tokenizer, seq_len: int):
    """Read and encode an SFT JSONL file (errors name the file, line and field)."""
    return [D.encode_sft(r, tokenizer, seq_len) for r in D.read_sft_jsonl(path)]


def demo_examples(tokenizer, seq_len: int, n: int, seed: int):
    """The demo's clean instruction pairs, encoded like JSONL records would be."""
    return [D.encode_sft(r, tokenizer, seq_len) for r in D.instruction_records(n, seed)]


PEFT_FILE_METHOD = {"lora": "lora", "dora": "dora", "ia3": "ia3", "prompt": "prompt_tuning",
                    "ptuning": "p_tuning", "prefix": "prefix_tuning"}


def export(config, workdir: str, result: trainer.Result):
    """Write the trained adapter in PEFT's format (WORKDIR/adapter) and, for methods that merge
    into the weights (full, LoRA, DoRA, IA3), the merged model in Hugging Face's (WORKDIR/merged)."""
    import jax

    from ptjax import peft
    from ptjax.interop import hf, peft_format

    if jax.process_index() != 0:
        return
    method = config.peft.method
    if method in PEFT_FILE_METHOD:
        peft_format.save_adapter(result.params, result.model_cfg, os.path.join(workdir, "adapter"),
                                 method=PEFT_FILE_METHOD[method], use_rslora=config.peft.rslora,
                                 base_model_name_or_path=config.model.init)
    if method in ("full", "lora", "dora", "ia3"):
        merged = jax.device_get(peft.finalize(result.params, config.peft))
        hf.save_params(merged, result.model_cfg, os.path.join(workdir, "merged"))


def run(config, workdir: str) -> trainer.Result:
    """Fine-tune `model.preset` (from `model.init` if given) on `data.train`, evaluating on `data.eval`."""
    tokenizer = D.load_tokenizer(config.data.tokenizer)
    seq_len = config.train.seq_len
    if config.data.train:
        train_examples = load_examples(config.data.train, tokenizer, seq_len)
    else:
        train_examples = demo_examples(tokenizer, seq_len, 20000, config.seed)
    if config.data.eval:
        eval_examples = load_examples(config.data.eval, tokenizer, seq_len)
    elif not config.data.train:
        eval_examples = demo_examples(tokenizer, seq_len, 500, config.seed + 1)
    else:
        eval_examples = []
    init_params = None
    if config.model.init:
        from ptjax.interop import hf

        init_params = hf.load_params(config.model.init, trainer.model_config(config))
    result = trainer.train(config, workdir, train_examples, eval_examples, init_params=init_params)
    export(config, workdir, result)
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    summary.setdefault("stages", {})["sft"] = {
        "trainable_params": result.trainable_params,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        **{k.replace("/", "_"): float(v) for k, v in result.metrics.items()
           if k.startswith("eval/")}}
    trainer.write_summary(summary_path, summary)
    return result

"""DPO (or IPO) from preference JSONL (`configs/dpo.py`), full or PEFT, optionally QLoRA.

The reference is the policy with its adapters off (LoRA, DoRA, IA3, adapters: one copy of the
base) or, for any method, sequence log-probs of the initial model computed once over all pairs
before training (`dpo.reference = "precomputed"`; "auto" picks adapters_off where it exists).
Held-out loss, reward accuracy and margin are reported; the trained model is exported as SFT's
is (WORKDIR/adapter, WORKDIR/merged).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from ptjax import quant
from ptjax import tree as ptree
from ptjax.data import pairs as P
from ptjax.recipes import reward as reward_recipe
from ptjax.recipes import sft
from ptjax.train import dpo, trainer

ADAPTER_METHODS = ("lora", "dora", "ia3", "adapter")


def reference_kind(config) -> str:
    """`dpo.reference` with "auto" resolved: adapters off where the method has adapters."""
    kind = config.dpo.reference
    if kind == "auto":
        return "adapters_off" if config.peft.method in ADAPTER_METHODS else "precomputed"
    if kind == "adapters_off" and config.peft.method not in ADAPTER_METHODS:
        raise ValueError(f"dpo.reference=adapters_off needs an adapter method "
                         f"{ADAPTER_METHODS}, not peft.method={config.peft.method!r}")
    if kind not in dpo.REFERENCES:
        raise ValueError(f"dpo.reference: {kind!r} is not one of {('auto',) + dpo.REFERENCES}")
    return kind


def precompute_reference(params, cfg, pairs, seq_len: int, batch_size: int, average: bool):
    """{"ref_chosen_logps", "ref_rejected_logps"}: the initial model's log-probs of every pair."""
    fn = jax.jit(functools.partial(dpo.pair_logps, cfg=cfg, average=average))
    chosen, rejected = [], []
    for batch in P.pair_eval_batches(pairs, seq_len, batch_size):
        c, r = ptree.to_host(fn(params, batch=batch))  # every process joins
        n = int(batch["weight"].sum())
        chosen.append(c[:n])
        rejected.append(r[:n])
    return {"ref_chosen_logps": np.concatenate(chosen), "ref_rejected_logps": np.concatenate(rejected)}


def dpo_objective(config, train_pairs, eval_pairs, reference: str, train_extras=None,
                  eval_extras=None) -> trainer.Objective:
    tc, d = config.train, config.dpo
    knobs = dict(beta=d.beta, loss_type=d.loss_type, reference=reference)
    return trainer.Objective(
        train_step=functools.partial(dpo.train_step, label_smoothing=d.label_smoothing, **knobs),
        eval_step=functools.partial(dpo.eval_step, **knobs), summarize=dpo.summarize,
        batches=P.PairBatches(train_pairs, tc.seq_len, tc.batch_size, config.seed, train_extras),
        eval_batches=P.pair_eval_batches(eval_pairs, tc.seq_len, tc.batch_size, eval_extras)[
            :config.eval.max_batches],
        tokens_per_batch=2 * tc.batch_size * tc.seq_len)


def run(config, workdir: str, train_pairs=None, eval_pairs=None, init_params=None,
        model_cfg=None, tokenizer=None) -> trainer.Result:
    """Read `data.train` (and `data.eval`, else hold out `dpo.eval_fraction`), train, export."""
    generation = None
    if init_params is None:
        model_cfg, init_params, tokenizer, generation = sft.load_base(config)
        if init_params is None:
            raise ValueError("model.init: DPO starts from a trained model (an SFT run, a Hugging "
                             "Face folder or a GGUF file)")
    seq_len = config.train.seq_len
    if train_pairs is None:
        train_pairs, eval_pairs = reward_recipe.read_pairs(config, tokenizer,
                                                           config.dpo.eval_fraction, "DPO")
    eval_pairs = eval_pairs or []
    reference = reference_kind(config)
    train_extras = eval_extras = None
    if reference == "precomputed":
        start = quant.apply(init_params, config.quant)
        average = config.dpo.loss_type == "ipo"
        train_extras = precompute_reference(start, model_cfg, train_pairs, seq_len,
                                            config.train.batch_size, average)
        if eval_pairs:
            eval_extras = precompute_reference(start, model_cfg, eval_pairs, seq_len,
                                               config.train.batch_size, average)
    result = trainer.train(config, workdir, init_params=init_params, model_cfg=model_cfg,
                           tokenizer=tokenizer,
                           objective=dpo_objective(config, train_pairs, eval_pairs, reference,
                                                   train_extras, eval_extras))
    sft.export(config, workdir, result, tokenizer, generation)
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    summary.setdefault("stages", {})["dpo"] = {
        "pairs": len(train_pairs), "held_out_pairs": len(eval_pairs), "reference": reference,
        "trainable_params": result.trainable_params,
        **{k.replace("eval/", ""): float(v) for k, v in result.metrics.items()
           if k.startswith("eval/")}}
    trainer.write_summary(summary_path, summary)
    return result

"""Train a reward model from preference JSONL and export it for PPO.

The body (full or PEFT, optionally on a quantized base) gets a scalar head read at the last real
token; training minimizes the Bradley-Terry loss and reports held-out pairwise accuracy. The
trained model is written to WORKDIR/reward_model: the merged body as a Hugging Face folder plus
`score_head.safetensors` (kernel [hidden, 1] and bias), which `load_reward_model` reads back.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from ptjax import data as D
from ptjax import peft
from ptjax import tree as ptree
from ptjax.data import pairs as P
from ptjax.models import heads
from ptjax.recipes import sft
from ptjax.train import reward, trainer

HEAD_FILE = "score_head.safetensors"


def reward_objective(config, train_pairs, eval_pairs) -> trainer.Objective:
    """Bradley-Terry on preference pairs, a fresh score head trained beside the PEFT method."""
    tc = config.train
    return trainer.Objective(
        train_step=functools.partial(reward.train_step, center_coef=config.reward.center_coef),
        eval_step=reward.eval_step, summarize=reward.summarize,
        batches=P.PairBatches(train_pairs, tc.seq_len, tc.batch_size, config.seed),
        eval_batches=P.pair_eval_batches(eval_pairs, tc.seq_len, tc.batch_size)[
            :config.eval.max_batches],
        tokens_per_batch=2 * tc.batch_size * tc.seq_len,
        add_params=functools.partial(add_score_head, likelihood=config.reward.likelihood),
        trainable=f"^{reward.HEAD}/")


def add_score_head(params, cfg, key, *, likelihood: bool):
    """A fresh scalar head, with the likelihood scale when `reward.likelihood` is on."""
    params = heads.add_head(params, cfg, key, name=reward.HEAD)
    return reward.add_likelihood_scale(params) if likelihood else params


def split_pairs(pairs, fraction: float, seed: int):
    """(train, held out): a seeded random `fraction` of the rows held out for evaluation (rows
    are pairs, or a prompt's group of pairs when no held-out prompt may be trained on)."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_eval = max(1, int(round(fraction * len(pairs)))) if fraction > 0 else 0
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def read_pair_file(path: str, tokenizer, seq_len: int, truncate: str = "left") -> list:
    """The encoded pairs of a preference JSONL file; over-long pairs are cut from the left or
    dropped (`data.truncate`), reported by file and line as SFT files are."""
    from ptjax.data import truncate as truncation

    truncation.check_policy(truncate)
    return truncation.encode_file(
        path, D.read_preference_jsonl_lines(path),
        lambda r: P.encode_pair_status(r, tokenizer, seq_len, truncate), seq_len, truncate,
        what="pair")


def read_pairs(config, tokenizer, eval_fraction: float, what: str):
    """(train pairs, held-out pairs) encoded from `data.train`, and `data.eval` if given, else
    a seeded `eval_fraction` of the training file. `what` names the trainer in the error."""
    if not config.data.train:
        raise ValueError(f"data.train: {what} needs a preference JSONL file "
                         "(prompt, chosen, rejected)")
    seq_len = config.train.seq_len
    read = lambda path: read_pair_file(path, tokenizer, seq_len, config.data.truncate)  # noqa: E731
    pairs = read(config.data.train)
    if config.data.eval:
        return pairs, read(config.data.eval)
    return split_pairs(pairs, eval_fraction, config.seed)


def save_reward_model(params, cfg, tokenizer, folder: str):
    """The merged body as a Hugging Face folder and the head beside it (see module docstring)."""
    from ptjax.interop import export

    params = jax.device_get(params)
    export.save_hf(params, cfg, tokenizer, folder)
    head = params[reward.HEAD]
    save_file({k: np.asarray(v, np.float32) for k, v in head.items()},
              os.path.join(folder, HEAD_FILE))


def load_reward_model(folder: str):
    """(params with the score head, model config) of a saved reward model.

    It scores the policy's token ids directly, so it must have been trained with the policy's
    tokenizer (PPO checks the vocabulary sizes agree).
    """
    from ptjax.interop import hf

    path = os.path.join(folder, HEAD_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{folder}: not a reward model (no {HEAD_FILE}); train one with "
                         "configs/reward.py")
    cfg = hf.config_from_hf(folder)
    params = {**hf.load_params(folder, cfg), reward.HEAD: dict(load_file(path))}
    return params, cfg


def run(config, workdir: str, train_pairs=None, eval_pairs=None, init_params=None,
        model_cfg=None, tokenizer=None) -> trainer.Result:
    """Read `data.train` (and `data.eval`, else hold out `reward.eval_fraction`), train, export.

    Callers holding pairs in memory (the demo) pass encoded `train_pairs`/`eval_pairs` and the
    body they start from instead.
    """
    if init_params is None:
        model_cfg, init_params, tokenizer, _ = sft.load_base(config)
    if train_pairs is None:
        train_pairs, eval_pairs = read_pairs(config, tokenizer, config.reward.eval_fraction,
                                             "a reward model")
    result = trainer.train(config, workdir, init_params=init_params, model_cfg=model_cfg,
                           tokenizer=tokenizer,
                           objective=reward_objective(config, train_pairs, eval_pairs or []))
    params = ptree.to_host(result.params)  # every process takes part; process 0 writes
    if jax.process_index() == 0:
        save_reward_model(peft.finalize(params, config.peft), result.model_cfg, tokenizer,
                          os.path.join(workdir, "reward_model"))
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    summary.setdefault("stages", {})["reward_model"] = {
        "pairs": len(train_pairs), "held_out_pairs": len(eval_pairs or []),
        "trainable_params": result.trainable_params,
        **{k.replace("eval/", ""): float(v) for k, v in result.metrics.items()
           if k.startswith("eval/")}}
    trainer.write_summary(summary_path, summary)
    return result

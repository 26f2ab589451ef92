"""PPO, DPO and GRPO side by side on the demo's tasks, from one SFT model.

The common start is the demo's (`ptjax.recipes.demo`): the base, its full SFT, two sampled
answers per prompt ranked by the graded ground truth, and the reward model trained on those
rankings (`demo_rlhf.reward_model_stage`). Each row of `alignment.rows` is then a trainer
(`ppo`, `dpo` or `grpo`) with settings laid over its stage section, trained from the SFT weights
on the same signal: DPO on the ranked pairs themselves, PPO and GRPO on the reward model trained
from them, or, with a reward function, on the graded ground truth directly (a verifiable reward).

Every row is measured the same way: greedy exact-match accuracy per task on the demo's held-out
questions, and over samples at `alignment.sample_temperature` from held-out prompts the reward
model's mean score, the mean ground-truth grade and the mean per-sequence KL to the SFT model
(summed log-ratio of the sampled tokens, a Monte-Carlo estimate): reward against KL, as the DPO
paper compares methods. Rows land in WORKDIR/summary.json as they finish; rerunning the command
skips finished rows and resumes the one in progress.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from ptjax import data as D
from ptjax import peft, sampling
from ptjax.recipes import demo, demo_rlhf
from ptjax.recipes import dpo as dpo_recipe
from ptjax.recipes import grpo as grpo_recipe
from ptjax.recipes import ppo as ppo_recipe
from ptjax.train import policy as policy_lib
from ptjax.train import trainer
from ptjax.train.config import with_overrides

TRAINERS = ("ppo", "dpo", "grpo")
# One compiled program for every row's measurement (a jit per call would recompile each time).
_token_logprobs = jax.jit(policy_lib.token_logprobs, static_argnames=("cfg", "temperature"))


def sampled_measures(params, sft_params, cfg, tokenizer, items, score_tokens, *,
                     temperature: float, max_new_tokens: int, seed: int) -> dict:
    """Mean reward-model score, mean `data.grade` and mean per-sequence KL to the SFT model of
    one sampled answer per `(task, prompt, answer)` item."""
    prompts = [D.encode_prompt(prompt, tokenizer) for _, prompt, _ in items]
    generate_fn = sampling.make_generate_fn(cfg, max_new_tokens, temperature, 0, 1.0,
                                            sampling.tokenizer_stop_ids(tokenizer),
                                            tokenizer.pad_id)
    ro = ppo_recipe.rollout(generate_fn, params, prompts, tokenizer, tokenizer.pad_id,
                            jax.random.key(seed), max(len(p) for p in prompts))
    logprobs = lambda p: np.asarray(_token_logprobs(p, cfg, ro.tokens, ro.mask,  # noqa: E731
                                                    temperature=temperature))
    log_ratio = logprobs(params) - logprobs(sft_params)
    grades = [D.grade(task, response, answer)
              for (task, _, answer), response in zip(items, ro.responses)]
    return {"reward_model_score": float(np.mean(score_tokens(ro.tokens, ro.mask, ro.response))),
            "grade": float(np.mean(grades)),
            "kl_to_sft": float(np.mean(np.sum(log_ratio * ro.response, axis=1)))}


def train_row(c, kind: str, workdir: str, sft: trainer.Result, tokenizer, rm: trainer.Result,
              score_tokens, train_pairs, eval_pairs, prompts) -> trainer.Result:
    """One row's training run from the SFT weights (see the module docstring); a separate PPO
    critic starts from the reward model `rm` when that is the reward."""
    cfg, params = sft.model_cfg, sft.params
    if kind == "dpo":
        return dpo_recipe.run(c, workdir, train_pairs, eval_pairs, init_params=params,
                              model_cfg=cfg, tokenizer=tokenizer)
    if kind == "ppo":
        scorer = (dict(score_texts=ppo_recipe.text_scorer(c.ppo.reward_fn)) if c.ppo.reward_fn
                  else dict(score_tokens=score_tokens, critic_init=(rm.params, rm.model_cfg)))
        return ppo_recipe.train(c, workdir, prompts, tokenizer, params, cfg, **scorer)
    if c.grpo.reward_fns:
        names, score = grpo_recipe.weighted_text_rewards(c.grpo.reward_fns, c.grpo.reward_weights)
        scorer = dict(score_texts=score, reward_names=names)
    else:
        scorer = dict(score_tokens=score_tokens)
    return grpo_recipe.train(c, workdir, prompts, tokenizer, params, cfg, **scorer)


def run(config, workdir: str) -> dict:
    """Every row of `alignment.rows` in WORKDIR/summary.json and WORKDIR/table.md."""
    started = time.time()
    a = config.alignment
    tokenizer = D.load_tokenizer(config.data.tokenizer)
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    rows = summary.setdefault("rows", {})
    eval_items = D.eval_set(config.demo.eval_examples, config.seed + 1000)
    accuracy = lambda params, cfg: demo.accuracy(params, cfg, tokenizer, eval_items,  # noqa: E731
                                                 config.peft)

    base = demo.pretrain_base(config, workdir, tokenizer)
    name, method, lr, quant_method = config.demo.stages[0]
    sft_row, sft = demo.finetune(config, workdir, name, base, tokenizer, eval_items, lr,
                                 quant_method, method=method)
    rm, rm_row, train_pairs, eval_pairs = demo_rlhf.reward_model_stage(config, workdir, sft,
                                                                       tokenizer)
    summary["reward_model"] = rm_row
    score_tokens = ppo_recipe.model_scorer(rm.params, sft.model_cfg, sft.model_cfg)
    prompts = [rec["prompt"] for rec in D.instruction_records(config.demo.rlhf.ppo_prompts,
                                                              config.seed + 9)]
    sample_items = D.eval_set(a.sample_prompts, config.seed + 2000)
    measure = functools.partial(sampled_measures, sft_params=sft.params, cfg=sft.model_cfg,
                                tokenizer=tokenizer, items=sample_items,
                                score_tokens=score_tokens, temperature=a.sample_temperature,
                                max_new_tokens=a.max_new_tokens, seed=config.seed + 11)
    if "sft" not in rows:
        rows["sft"] = {**accuracy(sft.params, sft.model_cfg), **measure(sft.params),
                       "seconds": sft_row["stage_seconds"]}
        trainer.write_summary(summary_path, summary)

    for name, kind, overrides in a.rows:
        if kind not in TRAINERS:
            raise ValueError(f"alignment.rows {name!r}: trainer {kind!r} is not one of {TRAINERS}")
        if name in rows:
            continue
        row_started = time.time()
        c = with_overrides(demo.stage_config(config, a[kind], method="full"), overrides,
                           f"alignment.rows {name!r}")
        result = train_row(c, kind, os.path.join(workdir, name.replace(" ", "_")), sft,
                           tokenizer, rm, score_tokens, train_pairs, eval_pairs, prompts)
        params = peft.finalize(result.params, c.peft)
        rows[name] = {**accuracy(params, sft.model_cfg), **measure(params),
                      "seconds": round(time.time() - row_started, 1)}
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[name].items()), flush=True)
        trainer.write_summary(summary_path, summary)

    summary["rows"] = {name: rows[name] for name in ["sft"] + [r[0] for r in a.rows]}
    summary["seconds"] = round(time.time() - started, 1)
    trainer.write_summary(summary_path, summary)
    table = markdown_table(summary["rows"])
    print(table)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    return summary


COLUMNS = ("accuracy", "accuracy_add", "accuracy_reverse", "accuracy_sort", "accuracy_count",
           "reward_model_score", "grade", "kl_to_sft", "seconds")


def markdown_table(rows: dict) -> str:
    """The rows as a Markdown table (README and WORKDIR/table.md)."""
    header = [k.replace("accuracy_", "") for k in COLUMNS]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in rows.items():
        cells = ["" if r.get(k) is None else f"{r[k]:.1f}" if k == "seconds" else f"{r[k]:.3f}"
                 for k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

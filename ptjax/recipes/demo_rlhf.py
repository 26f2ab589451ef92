"""The demo's RLHF stages after SFT: preference pairs from the SFT model, a reward model, PPO.

InstructGPT's recipe on the demo's tasks. The SFT model answers each prompt K times (sampled);
a graded ground truth (`data.grade`: numeric closeness, edit distance) ranks them, standing
in for a human labeller (every two answers of different grade are one comparison; ties are
dropped), and the reward model learns those rankings without ever seeing the right answer.
PPO then optimizes the SFT model against the reward model with a KL penalty to it.
Exact-match accuracy before (SFT) and after (PPO) is measured on the same held-out
questions, with the ground truth the reward model never saw.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ptjax import data as D
from ptjax import sampling
from ptjax.data import pairs as P
from ptjax.recipes import demo
from ptjax.recipes import ppo as ppo_recipe
from ptjax.recipes import reward as reward_recipe
from ptjax.train import metrics, trainer


def comparisons(task: str, prompt: str, answer: str, responses) -> list:
    """Every two distinct `responses` to one prompt whose `data.grade` differs, as preference
    records with the better one chosen; ties (and repeats of one answer) give none."""
    graded = {response: D.grade(task, response, answer) for response in responses}
    ranked = sorted(graded.items(), key=lambda kv: -kv[1])
    return [D.PreferenceRecord(prompt, better, worse)
            for j, (better, g_better) in enumerate(ranked)
            for worse, g_worse in ranked[j + 1:] if g_better > g_worse]


def ranked_pairs(params, cfg, tokenizer, items, *, samples: int, temperature: float, seed: int,
                 max_new_tokens: int = 16):
    """Per `(task, prompt, answer)` item, the `comparisons` among `samples` sampled answers,
    and the share of items that gave at least one pair.

    Why K answers per prompt: InstructGPT's labellers rank K = 4 to 9 responses at once, which
    yields up to K(K-1)/2 comparisons for one prompt's sampling and labelling cost; two answers
    give at most one. A list per item, so that held-out pairs can be split off by prompt.
    """
    prompts = [D.encode_prompt(prompt, tokenizer) for _, prompt, _ in items]
    answers = [sampling.generate_from_ids(params, cfg, tokenizer, prompts,
                                          max_new_tokens=max_new_tokens, temperature=temperature,
                                          seed=seed + k, batch_size=256) for k in range(samples)]
    per_item = [comparisons(task, prompt, answer, [sampled[i] for sampled in answers])
                for i, (task, prompt, answer) in enumerate(items)]
    return per_item, sum(bool(p) for p in per_item) / max(len(items), 1)


def reward_model_stage(config, workdir: str, sft_result: trainer.Result, tokenizer):
    """(reward-model result, its summary row, train pairs, held-out pairs): the `comparisons`
    among `samples_per_prompt` sampled answers per prompt from the SFT model, held out by
    prompt, and the reward model trained on them from the SFT weights (in
    WORKDIR/reward_model)."""
    r = config.demo.rlhf
    cfg, params = sft_result.model_cfg, sft_result.params
    started = time.time()
    items = D.eval_set(r.preference_prompts, config.seed + 7)
    per_item, kept = ranked_pairs(params, cfg, tokenizer, items, samples=r.samples_per_prompt,
                                  temperature=r.sample_temperature, seed=config.seed + 8)
    rm_cfg = demo.stage_config(config, r.reward_model, method="full")
    # held out by prompt, so no held-out pair shares its prompt with a training pair; only
    # prompts that gave a comparison count, so a held-out share always holds pairs
    train_items, eval_items = reward_recipe.split_pairs([p for p in per_item if p],
                                                        r.held_out_fraction, config.seed)
    encode = lambda groups: [P.encode_pair(rec, tokenizer, rm_cfg.train.seq_len)  # noqa: E731
                             for group in groups for rec in group]
    train_pairs, eval_pairs = encode(train_items), encode(eval_items)
    rm = reward_recipe.run(rm_cfg, os.path.join(workdir, "reward_model"), train_pairs, eval_pairs,
                           init_params=params, model_cfg=cfg, tokenizer=tokenizer)
    rm_row = {"pairs": len(train_pairs), "held_out_pairs": len(eval_pairs),
              "pair_yield": round(kept, 3),
              "pairwise_accuracy": float(rm.metrics["eval/pairwise_accuracy"]),
              "eval_loss": float(rm.metrics["eval/loss"]),
              "stage_seconds": round(time.time() - started, 1)}
    return rm, rm_row, train_pairs, eval_pairs


def run(config, workdir: str, sft_result: trainer.Result, tokenizer, eval_items, accuracy_fn):
    """The `reward_model` and `ppo` rows of the demo summary (see the module docstring)."""
    r = config.demo.rlhf
    cfg, params = sft_result.model_cfg, sft_result.params
    rm, rm_row, _, _ = reward_model_stage(config, workdir, sft_result, tokenizer)

    started = time.time()
    ppo_cfg = demo.stage_config(config, r.ppo, method="full")
    prompts = [rec["prompt"] for rec in D.instruction_records(r.ppo_prompts, config.seed + 9)]
    scorer = ppo_recipe.model_scorer(rm.params, cfg, cfg)
    ppo_dir = os.path.join(workdir, "ppo")
    result = ppo_recipe.train(ppo_cfg, ppo_dir, prompts, tokenizer, params, cfg,
                              score_tokens=scorer, critic_init=(rm.params, rm.model_cfg))
    rows = [row for row in metrics.read(ppo_dir) if "ppo/score" in row]
    last = rows[-max(1, len(rows) // 10):]  # the final tenth of the iterations
    ppo_row = {"mean_reward": float(np.mean([row["ppo/score"] for row in last])),
               "first_reward": float(rows[0]["ppo/score"]),
               "kl": float(np.mean([row["ppo/kl"] for row in last])),
               "kl_coef": float(rows[-1]["ppo/kl_coef"]),
               "iteration_seconds": {k: float(np.mean([row[f"time/{k}_s"] for row in rows[1:]]))
                                     for k in ("generate", "score", "train")},
               "stage_seconds": round(time.time() - started, 1),
               **accuracy_fn(result.params, cfg)}
    return rm_row, ppo_row


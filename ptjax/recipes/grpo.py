"""GRPO / RLOO from prompts and weighted reward functions (`configs/grpo.py`).

Each iteration takes `train.batch_size` prompts, samples `grpo.group_size` completions of each,
scores every completion with the weighted sum of the reward functions (and, if given, a reward
model), turns the rewards into group-relative advantages and takes `grpo.epochs` passes of
`grpo.minibatches` clipped updates. Resumable like PPO; WORKDIR/metrics.jsonl has per-iteration
score, each reward function's mean, KL, clip fraction, response length and the time split,
WORKDIR/grpo.png the reward and KL curves.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from tqdm import tqdm

from ptjax import checkpoint, sampling, sharding
from ptjax import tree as ptree
from ptjax import data as D
from ptjax.data import encode_prompt
from ptjax.recipes import ppo as ppo_recipe
from ptjax.train import failures, grpo, guard, preemption, run_record, trainer
from ptjax.train import metrics as metrics_lib


def weighted_text_rewards(specs: str, weights) -> tuple:
    """(names, `fn(prompts, responses) -> [n_fns, b]`) from "mod:fn,mod:fn2" and weights."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    fns = [ppo_recipe.reward_function(n) for n in names]
    weights = list(weights) or [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"grpo.reward_weights: {len(weights)} weights for {len(fns)} "
                         "functions in grpo.reward_fns")

    def score(prompts, responses):
        return np.array([[w * float(f(p, r)) for p, r in zip(prompts, responses)]
                         for f, w in zip(fns, weights)], np.float32)

    return names, score


def train(config, workdir: str, prompts: list, tokenizer, init_params, model_cfg, *,
          score_texts=None, score_tokens=None, reward_names=("reward",),
          show_progress: bool = True) -> trainer.Result:
    """Run (or resume) GRPO/RLOO. `score_texts(prompts, responses) -> [n, b]` (weighted
    components, summed) or `score_tokens(tokens, mask, response) -> [b]` (a reward model)."""
    trainer.write_config(config, workdir)
    gc, tc = config.grpo, config.train
    cfg = model_cfg
    g = gc.group_size
    rows_per_iteration = tc.batch_size * g
    if rows_per_iteration % gc.minibatches:
        raise ValueError(f"train.batch_size * grpo.group_size ({rows_per_iteration}) must be "
                         f"divisible by grpo.minibatches ({gc.minibatches})")
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = [tuple(r) for r in config.sharding_rules]
    sharding.check_rows_split(mesh, rows_per_iteration // gc.minibatches,
                              "train.batch_size * grpo.group_size / grpo.minibatches")
    prompt_ids = [np.asarray(p, np.int32) if not isinstance(p, str) else encode_prompt(p, tokenizer)
                  for p in prompts]
    prompt_len = max(len(p) for p in prompt_ids)
    state, shardings, _, tx = trainer.initial_state(config, cfg, mesh, rules, init_params, tokenizer)
    with_reference = gc.beta > 0
    reference = ppo_recipe.frozen_reference(state.params) if with_reference else None
    generate_fn = sampling.make_generate_fn(cfg, gc.max_new_tokens, gc.temperature, gc.top_k,
                                            gc.top_p, sampling.tokenizer_stop_ids(tokenizer),
                                            tokenizer.pad_id)
    logp_fn = jax.jit(functools.partial(grpo.rollout_logprobs, model_cfg=cfg,
                                        temperature=gc.temperature, with_reference=with_reference))
    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)
    with sharding.use(mesh, rules):
        update_fn = trainer.jit_train_step(
            functools.partial(grpo.update_step, temperature=gc.temperature,
                              clip_eps=gc.clip_eps, beta=gc.beta),
            cfg, tx, tc.grad_accum, shardings, batch_sharding, mesh)
    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
    record = run_record.describe(config, cfg, state.trainable, tokenizer,
                                 state.opt_state)
    run_record.check_workdir(mngr, record, config.checkpoint.allow_changes)
    states, start, _ = ppo_recipe.restore_or_start(mngr, {"policy": state}, {"policy": shardings},
                                                   {"beta": gc.beta})
    state = states["policy"]
    log = metrics_lib.MetricsLog(workdir, resume_step=start)
    keys = jax.random.fold_in(jax.random.key(config.seed), 5)
    order = np.random.default_rng(config.seed).permutation(len(prompt_ids))
    mb = rows_per_iteration // gc.minibatches
    last: dict = {}
    streak = 0  # consecutive minibatch updates skipped for a non-finite loss or gradient
    with sharding.use(mesh, rules), preemption.Watch() as preempt:
        bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc=gc.estimator,
                   disable=not show_progress or jax.process_index() != 0, dynamic_ncols=True)
        for it in bar:
            key = jax.random.fold_in(keys, it)
            t0 = time.perf_counter()
            picks = [order[(it * tc.batch_size + i) % len(order)] for i in range(tc.batch_size)]
            group_prompts = [prompt_ids[i] for i in picks for _ in range(g)]  # groups in a row
            ro = ppo_recipe.rollout(generate_fn, state.params, group_prompts, tokenizer,
                                    tokenizer.pad_id, jax.random.fold_in(key, 0), prompt_len)
            t1 = time.perf_counter()
            if score_tokens is not None:
                parts = np.asarray(score_tokens(ro.tokens, ro.mask, ro.response),
                                   np.float32)[None]
            else:
                parts = np.asarray(score_texts(ro.prompts, ro.responses), np.float32)
            rewards = parts.sum(0) + np.where(ro.done, 0.0, gc.missing_eos_penalty)
            advantages = np.asarray(grpo.group_advantages(rewards, g, gc.estimator))
            t2 = time.perf_counter()
            batch = {"tokens": ro.tokens, "mask": ro.mask, "response": ro.response}
            full = ptree.to_host({**batch, **logp_fn(state.params, reference, batch),
                                  "advantages": advantages.astype(np.float32)})
            step_metrics = []
            for epoch in range(gc.epochs):
                perm = np.random.default_rng([config.seed, it, epoch]).permutation(rows_per_iteration)
                for j in range(gc.minibatches):
                    idx = perm[j * mb:(j + 1) * mb]
                    minibatch = trainer.to_device({k: v[idx] for k, v in full.items()},
                                                  batch_sharding)
                    state, m = update_fn(state, minibatch, jax.random.fold_in(key, 1 + 97 * epoch + j))
                    step_metrics.append(m)
            step_metrics = ptree.to_host(step_metrics)
            streak, longest = guard.host_streak(streak, [m["nonfinite"] for m in step_metrics])
            t3 = time.perf_counter()
            row = {"grpo/score": float(parts.sum(0).mean()),
                   "grpo/kl": float(np.mean([m["kl"] for m in step_metrics])
                                    * ro.response.sum(1).mean()),
                   "grpo/kl_per_token": float(np.mean([m["kl"] for m in step_metrics])),
                   "grpo/clip_fraction": float(np.mean([m["clip_fraction"] for m in step_metrics])),
                   "grpo/loss": float(np.mean([m["loss"] for m in step_metrics])),
                   "grpo/response_length": float(ro.response.sum(1).mean()),
                   "grpo/eos_fraction": float(ro.done.mean()),
                   "grpo/group_reward_std": float(rewards.reshape(-1, g).std(1, ddof=1).mean()),
                   "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2,
                   **{f"reward/{n}": float(p.mean()) for n, p in zip(reward_names, parts)}}
            row["grpo/skipped_updates"] = float(sum(m["nonfinite"] for m in step_metrics))
            log.write(it + 1, row)
            last = row
            bar.set_postfix(score=f"{row['grpo/score']:.3f}")
            ppo_recipe.stop_if_diverged(mngr, log, longest, it + 1, tc.max_bad_steps)
            preempted = preempt.reached(it + 1)  # asked once per iteration, on every process
            if preempted or (it + 1) % config.checkpoint.every == 0 or it + 1 == tc.steps:
                checkpoint.save(mngr, it + 1, {"policy": trainer.saved_part(state, False)},
                                {"step": it + 1}, run=record)
            ppo_recipe.stop_if_preempted(preempted, mngr, log, it + 1)
        bar.close()
    checkpoint.finish(mngr, tc.steps)  # a failed background save is raised here
    log.close()
    if jax.process_index() == 0:
        ppo_recipe.plot_curves(workdir, prefix="grpo")
    return trainer.Result(params=state.params, model_cfg=cfg, metrics=last,
                          trainable_params=ptree.count(state.trainable),
                          optimizer_state_bytes=ptree.nbytes(state.opt_state))


def run(config, workdir: str) -> trainer.Result:
    """`configs/grpo.py`: prompts from `grpo.prompts`, the policy from `model.init`, rewards from
    `grpo.reward_fns` (weighted by `grpo.reward_weights`) or `grpo.reward_model`."""
    from ptjax.recipes import reward as reward_recipe
    from ptjax.recipes import sft

    gc = config.grpo
    if bool(gc.reward_model) == bool(gc.reward_fns):
        raise ValueError("grpo.reward_model / grpo.reward_fns: set exactly one")
    if not gc.prompts:
        raise ValueError("grpo.prompts: a JSONL file of {\"prompt\": ...} records is required")
    prompts = D.read_prompts_jsonl(gc.prompts)
    model_cfg, init_params, tokenizer, _ = sft.load_base(config)
    if init_params is None:
        raise ValueError("model.init: GRPO starts from a trained policy (an SFT run, a Hugging "
                         "Face folder or a GGUF file)")
    if gc.reward_model:
        rm_params, rm_cfg = reward_recipe.load_reward_model(gc.reward_model)
        scorer = dict(score_tokens=ppo_recipe.model_scorer(rm_params, rm_cfg, model_cfg))
    else:
        names, score = weighted_text_rewards(gc.reward_fns, gc.reward_weights)
        scorer = dict(score_texts=score, reward_names=names)
    return train(config, workdir, prompts, tokenizer, init_params, model_cfg, **scorer)

"""PPO with a KL penalty against a reward model or a Python reward function (`configs/ppo.py`).

Each iteration samples one response per prompt from the current policy, scores it, computes
rollout statistics and whitened GAE advantages once, then runs `ppo.epochs` passes of
`ppo.minibatches` clipped updates (`ptjax.train.ppo`). The KL coefficient is fixed or adapted
(Ziegler et al.). Iterations are checkpointed with the KL coefficient and the prompt position,
so rerunning the same command resumes; WORKDIR/metrics.jsonl holds per-iteration metrics
(score, KL, coefficient, entropy, clip fraction, approximate KL, value loss, explained variance,
response length and the seconds spent generating, scoring and training), WORKDIR/ppo.png the
reward and KL curves.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from ptjax import checkpoint, sampling, sharding
from ptjax import tree as ptree
from ptjax import data as D
from ptjax.data import encode_prompt
from ptjax.models import heads
from ptjax.train import metrics as metrics_lib
from ptjax.train import policy as policy_lib
from ptjax.train import ppo, reward, rl_math, trainer


def reward_function(spec: str):
    """The Python function `module:function` names: `fn(prompt: str, response: str) -> float`
    (verifiable tasks: exact answers, unit tests, format checks)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"ppo.reward_fn: {spec!r} is not 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"ppo.reward_fn: cannot import {spec!r} ({e})") from None
    return fn


def text_scorer(spec: str):
    """`score(prompts, responses) -> list of floats` from the reward function `spec` names."""
    fn = reward_function(spec)
    return lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses)]


def model_scorer(reward_params, reward_cfg, policy_cfg):
    """`score(tokens, mask) -> [b]` from a reward model that reads the policy's token ids."""
    if reward_cfg.vocab_size != policy_cfg.vocab_size:
        raise ValueError(f"ppo.reward_model: vocabulary of {reward_cfg.vocab_size} tokens, the "
                         f"policy's has {policy_cfg.vocab_size}: train the reward model with the "
                         "policy's tokenizer")
    fn = jax.jit(functools.partial(reward.scores, cfg=reward_cfg))
    return lambda tokens, mask: np.asarray(fn(reward_params, tokens=tokens, mask=mask))


@dataclasses.dataclass
class Rollout:
    """One iteration's sampled batch as host arrays ([b, T] over prompt then response)."""

    tokens: np.ndarray
    mask: np.ndarray
    response: np.ndarray
    done: np.ndarray
    prompts: list
    responses: list


def rollout(generate_fn, params, prompt_ids, tokenizer, pad_id, rng, prompt_len: int) -> Rollout:
    """Sample one response per prompt (left-padded to `prompt_len`) and lay out the rows."""
    tokens, mask = sampling.left_pad(prompt_ids, prompt_len, pad_id)
    out = jax.device_get(generate_fn(params, tokens, mask, rng))
    n = out["tokens"].shape[1]
    valid = np.arange(n)[None, :] < out["lengths"][:, None]
    stop = set(sampling.tokenizer_stop_ids(tokenizer))
    responses = [tokenizer.decode([int(t) for t in row[:k] if int(t) not in stop])
                 for row, k in zip(out["tokens"], out["lengths"])]
    return Rollout(tokens=np.concatenate([tokens, out["tokens"]], 1).astype(np.int32),
                   mask=np.concatenate([mask, valid], 1).astype(np.int32),
                   response=np.concatenate([np.zeros_like(mask, bool), valid], 1),
                   done=np.asarray(out["done"]),
                   prompts=[tokenizer.decode([int(t) for t in p]) for p in prompt_ids],
                   responses=responses)


def plot_curves(workdir: str, prefix: str = "ppo"):
    """WORKDIR/{prefix}.png: mean score and mean per-sequence KL against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in metrics_lib.read(workdir) if f"{prefix}/score" in r]
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r[f"{prefix}/score"] for r in rows])
    a.set(xlabel="iteration", ylabel="mean score", title="reward")
    b.plot(steps, [r[f"{prefix}/kl"] for r in rows], color="tab:red")
    b.set(xlabel="iteration", ylabel="nats per sequence", title="KL to the reference")
    fig.tight_layout()
    path = os.path.join(workdir, f"{prefix}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frozen_reference(params, drop=()):
    """None when the policy has adapters (the reference is the policy with them off, the same
    base arrays), else a copy of the starting policy (full fine-tuning needs one)."""
    if policy_lib.has_adapters(params):
        return None
    return jax.tree.map(jnp.copy, {k: v for k, v in params.items() if k not in drop})


def restore_or_start(mngr, state, shardings, initial: dict):
    """(state, first iteration, loop data) from the newest checkpoint, or the fresh state."""
    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(
        trainer.saved_part(state, False), trainer.saved_part(shardings, False)))
    if restored is None:
        return state, 0, dict(initial)
    start, saved, data_state = restored
    return saved.replace(frozen=ptree.merge(saved.frozen, state.frozen)), start, dict(data_state)


def with_value_lr(config):
    """`config` whose optimizer gives the value head its own peak learning rate `ppo.value_lr`.

    Why: the head starts from random weights on a pretrained body and must fit returns within
    a few hundred steps; at the policy's learning rate (1e-5-ish) it barely moves, the values
    stay near zero and the advantages lose their prompt-dependent baseline.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.optim.lr_by_path = ((f"^{ppo.VALUE_HEAD}/", float(config.ppo.value_lr)),
                          *config.optim.lr_by_path)
    return c


def train(config, workdir: str, prompts: list, tokenizer, init_params, model_cfg, *,
          score_texts=None, score_tokens=None, show_progress: bool = True) -> trainer.Result:
    """Run (or resume) PPO from `init_params` on `prompts` (strings or int32 id arrays).

    Scores come from `score_tokens(tokens, mask) -> [b]` (a reward model) or
    `score_texts(prompts, responses) -> [b]` (a function of the decoded text).
    """
    trainer.write_config(config, workdir)
    pc, tc = config.ppo, config.train
    cfg = model_cfg
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = [tuple(r) for r in config.sharding_rules]
    if tc.batch_size % pc.minibatches:
        raise ValueError(f"train.batch_size ({tc.batch_size}) must be divisible by "
                         f"ppo.minibatches ({pc.minibatches})")
    sharding.check_rows_split(mesh, tc.batch_size // pc.minibatches,
                              "train.batch_size / ppo.minibatches")
    prompt_ids = [np.asarray(p, np.int32) if not isinstance(p, str) else encode_prompt(p, tokenizer)
                  for p in prompts]
    prompt_len = max(len(p) for p in prompt_ids)
    add_value_head = lambda p, c, k: heads.add_head(p, c, k, name=ppo.VALUE_HEAD)  # noqa: E731
    state, shardings, _, tx = trainer.initial_state(
        with_value_lr(config), cfg, mesh, rules, init_params, tokenizer, add_value_head,
        f"^{ppo.VALUE_HEAD}/")
    reference = frozen_reference(state.params, drop=(ppo.VALUE_HEAD,))
    generate_fn = sampling.make_generate_fn(
        cfg, pc.max_new_tokens, pc.temperature, pc.top_k, pc.top_p,
        sampling.tokenizer_stop_ids(tokenizer), tokenizer.pad_id)
    stats_fn = jax.jit(functools.partial(ppo.rollout_statistics, model_cfg=cfg,
                                         temperature=pc.temperature))
    adv_fn = jax.jit(functools.partial(ppo.advantages, kl_kind=pc.kl_kind, gamma=pc.gamma,
                                       lam=pc.lam))
    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)
    with sharding.use(mesh, rules):
        update_fn = trainer.jit_train_step(
            functools.partial(ppo.update_step, temperature=pc.temperature, clip_eps=pc.clip_eps,
                              clip_eps_value=pc.clip_eps_value, value_coef=pc.value_coef,
                              entropy_coef=pc.entropy_coef),
            cfg, tx, tc.grad_accum, shardings, batch_sharding, mesh)

    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
    state, start, loop = restore_or_start(mngr, state, shardings, {"beta": float(pc.kl_coef)})
    beta = float(loop["beta"])
    log = metrics_lib.MetricsLog(workdir, resume_step=start)
    keys = jax.random.fold_in(jax.random.key(config.seed), 4)
    b, mb = tc.batch_size, tc.batch_size // pc.minibatches
    order = np.random.default_rng(config.seed).permutation(len(prompt_ids))
    last: dict = {}
    with sharding.use(mesh, rules):
        bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="ppo",
                   disable=not show_progress or jax.process_index() != 0, dynamic_ncols=True)
        for it in bar:
            key = jax.random.fold_in(keys, it)
            t0 = time.perf_counter()
            picks = [order[(it * b + i) % len(order)] for i in range(b)]
            ro = rollout(generate_fn, state.params, [prompt_ids[i] for i in picks], tokenizer,
                         tokenizer.pad_id, jax.random.fold_in(key, 0), prompt_len)
            t1 = time.perf_counter()
            if score_tokens is not None:
                score = np.asarray(score_tokens(ro.tokens, ro.mask), np.float32)
            else:
                score = np.asarray(score_texts(ro.prompts, ro.responses), np.float32)
            raw_score = score.copy()
            score = score + np.where(ro.done, 0.0, pc.missing_eos_penalty).astype(np.float32)
            t2 = time.perf_counter()
            batch = {"tokens": ro.tokens, "mask": ro.mask, "response": ro.response}
            stats = stats_fn(state.params, reference, batch)
            adv = adv_fn(stats, score, ro.response, beta=beta)
            full = jax.device_get({**batch, **stats, "advantages": adv["advantages"],
                                   "returns": adv["returns"]})
            epoch_metrics = []
            for epoch in range(pc.epochs):
                perm = np.random.default_rng([config.seed, it, epoch]).permutation(b)
                for j in range(pc.minibatches):
                    idx = perm[j * mb:(j + 1) * mb]
                    minibatch = trainer.to_device({k: v[idx] for k, v in full.items()},
                                                  batch_sharding)
                    state, m = update_fn(state, minibatch, jax.random.fold_in(key, 1 + epoch * 97 + j))
                    epoch_metrics.append(m)
            epoch_metrics = jax.device_get(epoch_metrics)
            t3 = time.perf_counter()
            kl = float(np.mean(jax.device_get(adv["kl"])))
            row = {
                "ppo/score": float(raw_score.mean()), "ppo/kl": kl, "ppo/kl_coef": beta,
                "ppo/response_length": float(ro.response.sum(1).mean()),
                "ppo/eos_fraction": float(ro.done.mean()),
                "ppo/explained_variance": float(rl_math.explained_variance(
                    stats["old_values"], adv["returns"], ro.response)),
                "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2,
                **{f"ppo/{k}": float(np.mean([m[k] for m in epoch_metrics]))
                   for k in ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl",
                             "value_clip_fraction", "grad_norm")}}
            if pc.adaptive_kl:
                beta = float(rl_math.adaptive_kl_coef(beta, kl, pc.kl_target, pc.kl_horizon, b))
            log.write(it + 1, row)
            last = row
            bar.set_postfix(score=f"{row['ppo/score']:.3f}", kl=f"{kl:.2f}")
            if (it + 1) % config.checkpoint.every == 0 or it + 1 == tc.steps:
                checkpoint.save(mngr, it + 1, trainer.saved_part(state, False),
                                {"step": it + 1, "beta": beta})
        bar.close()
    mngr.wait_until_finished()
    mngr.close()
    log.close()
    if jax.process_index() == 0:
        plot_curves(workdir)
    params = {k: v for k, v in state.params.items() if k != ppo.VALUE_HEAD}
    return trainer.Result(params=params, model_cfg=cfg, metrics=last,
                          trainable_params=ptree.count(state.trainable),
                          optimizer_state_bytes=ptree.nbytes(state.opt_state))


def run(config, workdir: str) -> trainer.Result:
    """`configs/ppo.py`: prompts from `ppo.prompts` (JSONL with a `prompt` field), the policy from
    `model.init`, the reward from `ppo.reward_model` or `ppo.reward_fn`."""
    from ptjax.recipes import reward as reward_recipe
    from ptjax.recipes import sft

    pc = config.ppo
    if bool(pc.reward_model) == bool(pc.reward_fn):
        raise ValueError("ppo.reward_model / ppo.reward_fn: set exactly one")
    if not pc.prompts:
        raise ValueError("ppo.prompts: a JSONL file of {\"prompt\": ...} records is required")
    prompts = D.read_prompts_jsonl(pc.prompts)
    model_cfg, init_params, tokenizer, _ = sft.load_base(config)
    if pc.reward_model:
        rm_params, rm_cfg = reward_recipe.load_reward_model(pc.reward_model)
        scorer = dict(score_tokens=model_scorer(rm_params, rm_cfg, model_cfg))
    else:
        scorer = dict(score_texts=text_scorer(pc.reward_fn))
    return train(config, workdir, prompts, tokenizer, init_params, model_cfg, **scorer)

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
from ptjax.train import failures, guard, ppo, preemption, reward, rl_math, run_record, trainer


CRITICS = ("shared", "separate")


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
    """`score(tokens, mask, response) -> [b]` from a reward model that reads the policy's token
    ids (`response` masks the response tokens, for a reward model with a likelihood term)."""
    if reward_cfg.vocab_size != policy_cfg.vocab_size:
        raise ValueError(f"ppo.reward_model: vocabulary of {reward_cfg.vocab_size} tokens, the "
                         f"policy's has {policy_cfg.vocab_size}: train the reward model with the "
                         "policy's tokenizer")
    fn = jax.jit(functools.partial(reward.scores, cfg=reward_cfg))
    return lambda tokens, mask, response: np.asarray(ptree.to_host(
        fn(reward_params, tokens=tokens, mask=mask, response=response)))


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
    out = ptree.to_host(generate_fn(params, tokens, mask, rng))  # every process joins
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


def wrapped_batch(items, start: int, batch: int) -> list:
    """`batch` items from index `start`, wrapping to the first ones past the end, so every
    batch has the same number of rows (the jitted sampler's shape and the mesh's split)."""
    return [items[j % len(items)] for j in range(start, start + batch)]


def score_normalization(score_of, sample, prompt_ids: list, n: int, batch: int):
    """(bias, gain) that give the starting policy's scores mean 0 and standard deviation 1:
    `score_of(sample(prompts, index))` over the first `n` prompts, `batch` at a time.

    Why (Ziegler et al.; InstructGPT): a reward model's scale is arbitrary (a Bradley-Terry
    head is only defined up to a shift, and its spread grows with training), while the KL
    coefficient is in reward units; normalized, `ppo.kl_coef` means the same for any reward
    model. The statistics are fixed before the first update and checkpointed.
    """
    scores = np.concatenate([score_of(sample(wrapped_batch(prompt_ids, i, batch), i))
                             for i in range(0, n, batch)])
    return float(-scores.mean()), float(1.0 / max(scores.std(), 1e-6))


def prompts_with_varied_responses(sample, prompt_ids: list, samples: int, batch: int) -> list:
    """Indices of the prompts to which `samples` responses, `sample(prompts, index)`'d `batch`
    prompts at a time, are not all the same text.

    Why: a prompt the policy answers the same way every time gets the same reward on every
    rollout, so after the critic's baseline its advantage is about zero and its rollouts cost
    a training pass for no signal. Dropping such prompts before PPO starts (the policy's own
    agreement with itself; no reward or label is read) spends the iterations where the
    policy is unsure, as GRPO's dynamic sampling drops groups of equal rewards.
    """
    n = len(prompt_ids)
    answers = [set() for _ in range(n)]
    for k in range(samples):
        for i in range(0, n, batch):
            for j, response in zip(range(i, min(i + batch, n)),  # wrapped rows not counted
                                   sample(wrapped_batch(prompt_ids, i, batch),
                                          k * n + i).responses):
                answers[j].add(response)
    return [i for i in range(n) if len(answers[i]) > 1]


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


def restore_or_start(mngr, states: dict, shardings: dict, initial: dict):
    """(states, first iteration, loop data) from the newest checkpoint, or the fresh `states`
    (a dict of TrainStates: the policy, and a separate critic when there is one)."""
    def saved(tree):
        return {k: trainer.saved_part(s, False) for k, s in tree.items()}

    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(saved(states),
                                                                        saved(shardings)))
    if restored is None:
        return states, 0, dict(initial)
    start, saved, data_state = restored
    return ({k: saved[k].replace(frozen=ptree.merge(saved[k].frozen, s.frozen))
             for k, s in states.items()}, start, dict(data_state))


def stop_if_diverged(mngr, log, longest: int, iteration: int, max_bad_steps: int):
    """Stop an RL loop (PPO, GRPO) as `trainer.train` stops: after `train.max_bad_steps`
    consecutive minibatch updates with a non-finite loss or gradient norm (each skipped inside
    the step), naming the iteration and the last good checkpoint."""
    if max_bad_steps > 0 and longest >= max_bad_steps:
        checkpoint.finish(mngr, iteration)
        log.close()
        raise guard.stop_error(longest, iteration, max_bad_steps, failures.last_good(
            str(mngr.directory), checkpoint.latest_step(mngr)))


def stop_if_preempted(preempted: bool, mngr, log, iteration: int):
    """After SIGTERM (or the runtime's preemption notice: `preempted`, from
    `preemption.Watch.reached`), once this iteration is saved on every process: let the save
    land and end the run with `Preempted` (launch.py exits 0)."""
    if preempted:
        checkpoint.finish(mngr, iteration)
        log.close()
        raise failures.Preempted(iteration, str(mngr.directory))


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


def critic_config(config):
    """The separate critic's run config: every weight trained in full precision (no PEFT,
    quantization or pruning, whatever the policy has), the body at `ppo.critic_lr` and the value
    head at `ppo.value_lr`."""
    c = with_value_lr(config)
    c.peft.method = "full"
    c.quant.method = ""
    c.prune.method = ""
    c.optim.lr = float(config.ppo.critic_lr)
    return c


def critic_start(critic_init, init_params, model_cfg):
    """(params, model config) the separate critic starts from: `critic_init` (a reward model's
    `(params, cfg)`, its score head becoming the value head, as in InstructGPT) or, when None,
    the policy's starting weights without a value head (`initial_state` adds a fresh one)."""
    if critic_init is None:
        return {k: v for k, v in init_params.items() if k != ppo.VALUE_HEAD}, model_cfg
    params, cfg = critic_init
    params = dict(params)
    if reward.HEAD in params:  # a likelihood scale is the reward's, not a value head's
        params[ppo.VALUE_HEAD] = {k: v for k, v in params.pop(reward.HEAD).items()
                                  if k != reward.LIKELIHOOD}
    return params, cfg


def train(config, workdir: str, prompts: list, tokenizer, init_params, model_cfg, *,
          score_texts=None, score_tokens=None, critic_init=None,
          show_progress: bool = True) -> trainer.Result:
    """Run (or resume) PPO from `init_params` on `prompts` (strings or int32 id arrays).

    Scores come from `score_tokens(tokens, mask, response) -> [b]` (a reward model) or
    `score_texts(prompts, responses) -> [b]` (a function of the decoded text). With
    `ppo.critic=separate` the critic starts from `critic_init` (a reward model's `(params, cfg)`)
    or, when None, from `init_params` (`critic_start`).
    """
    trainer.write_config(config, workdir)
    pc, tc = config.ppo, config.train
    cfg = model_cfg
    if pc.critic not in CRITICS:
        raise ValueError(f"ppo.critic: {pc.critic!r} is not one of {CRITICS}")
    separate = pc.critic == "separate"
    critic_cfg = None
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
    policy_init = {k: v for k, v in init_params.items() if k != ppo.VALUE_HEAD}
    states, state_shardings = {}, {}
    states["policy"], state_shardings["policy"], _, tx = trainer.initial_state(
        with_value_lr(config), cfg, mesh, rules, policy_init if separate else init_params,
        tokenizer, None if separate else add_value_head, "" if separate else f"^{ppo.VALUE_HEAD}/")
    if separate:
        critic_params, critic_cfg = critic_start(critic_init, init_params, cfg)
        states["critic"], state_shardings["critic"], _, critic_tx = trainer.initial_state(
            critic_config(config), critic_cfg, mesh, rules, critic_params, tokenizer,
            None if ppo.VALUE_HEAD in critic_params else add_value_head)
    reference = frozen_reference(states["policy"].params, drop=(ppo.VALUE_HEAD,))
    generate_fn = sampling.make_generate_fn(
        cfg, pc.max_new_tokens, pc.temperature, pc.top_k, pc.top_p,
        sampling.tokenizer_stop_ids(tokenizer), tokenizer.pad_id)
    stats_fn = jax.jit(functools.partial(ppo.rollout_statistics, model_cfg=cfg,
                                         temperature=pc.temperature,
                                         critic_cfg=critic_cfg))
    adv_fn = jax.jit(functools.partial(ppo.advantages, kl_kind=pc.kl_kind, gamma=pc.gamma,
                                       lam=pc.lam))
    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)
    with sharding.use(mesh, rules):
        update_fn = trainer.jit_train_step(
            functools.partial(ppo.update_step, temperature=pc.temperature, clip_eps=pc.clip_eps,
                              clip_eps_value=pc.clip_eps_value, value_coef=pc.value_coef,
                              entropy_coef=pc.entropy_coef),
            cfg, tx, tc.grad_accum, state_shardings["policy"], batch_sharding, mesh)
        if separate:
            critic_fn = trainer.jit_train_step(
                functools.partial(ppo.critic_step, clip_eps_value=pc.clip_eps_value),
                critic_cfg, critic_tx, tc.grad_accum, state_shardings["critic"], batch_sharding,
                mesh)

    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
    record = run_record.describe(config, cfg, states["policy"].trainable, tokenizer,
                                 states["policy"].opt_state)
    run_record.check_workdir(mngr, record, config.checkpoint.allow_changes)
    start_params = states["policy"].params  # the starting policy, before any restore

    def sample_start(salt: int):
        """`sample(prompt_ids, index)`: one response per prompt from the starting policy, keyed
        by `salt` and `index` (the prompt filter's and the score normalization's samples)."""
        salt_keys = jax.random.fold_in(jax.random.key(config.seed), salt)
        return lambda ids, i: rollout(generate_fn, start_params, ids, tokenizer,
                                      tokenizer.pad_id, jax.random.fold_in(salt_keys, i),
                                      prompt_len)

    if pc.prompt_filter_samples > 1:  # before any restore: a resumed run keeps the same prompts
        kept = prompts_with_varied_responses(sample_start(7), prompt_ids,
                                             int(pc.prompt_filter_samples), tc.batch_size)
        if not kept:
            raise ValueError(f"ppo.prompt_filter_samples: the starting policy gave all "
                             f"{pc.prompt_filter_samples} responses the same for every one of "
                             f"the {len(prompt_ids)} prompts; nothing is left to train on "
                             "(set it to 0 to keep every prompt)")
        prompt_ids = [prompt_ids[i] for i in kept]
    states, start, loop = restore_or_start(mngr, states, state_shardings,
                                           {"beta": float(pc.kl_coef), "score_bias": 0.0,
                                            "score_gain": 1.0})
    state, critic = states["policy"], states.get("critic")
    beta = float(loop["beta"])
    log = metrics_lib.MetricsLog(workdir, resume_step=start)
    keys = jax.random.fold_in(jax.random.key(config.seed), 4)
    b, mb = tc.batch_size, tc.batch_size // pc.minibatches
    order = np.random.default_rng(config.seed).permutation(len(prompt_ids))

    def score_of(ro: Rollout) -> np.ndarray:
        if score_tokens is not None:
            return np.asarray(score_tokens(ro.tokens, ro.mask, ro.response), np.float32)
        return np.asarray(score_texts(ro.prompts, ro.responses), np.float32)

    last: dict = {}
    streak = 0  # consecutive minibatch updates skipped for a non-finite loss or gradient
    with sharding.use(mesh, rules), preemption.Watch() as preempt:
        bias, gain = float(loop.get("score_bias", 0.0)), float(loop.get("score_gain", 1.0))
        if start == 0 and pc.score_normalization_samples:
            bias, gain = score_normalization(
                score_of, sample_start(6), [prompt_ids[i] for i in order],
                int(pc.score_normalization_samples), b)
        bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="ppo",
                   disable=not show_progress or jax.process_index() != 0, dynamic_ncols=True)
        for it in bar:
            key = jax.random.fold_in(keys, it)
            t0 = time.perf_counter()
            picks = wrapped_batch(order, it * b, b)
            ro = rollout(generate_fn, state.params, [prompt_ids[i] for i in picks], tokenizer,
                         tokenizer.pad_id, jax.random.fold_in(key, 0), prompt_len)
            t1 = time.perf_counter()
            raw_score = score_of(ro)
            score = ((raw_score + bias) * gain
                     + np.where(ro.done, 0.0, pc.missing_eos_penalty)).astype(np.float32)
            t2 = time.perf_counter()
            batch = {"tokens": ro.tokens, "mask": ro.mask, "response": ro.response}
            stats = stats_fn(state.params, reference, batch,
                             critic=None if critic is None else critic.params)
            adv = adv_fn(stats, score, ro.response, beta=beta)
            full = ptree.to_host({**batch, **stats, "advantages": adv["advantages"],
                                  "returns": adv["returns"], "kl": adv["kl"]})
            kl = float(np.mean(full.pop("kl")))
            epoch_metrics = []
            for epoch in range(pc.epochs):
                perm = np.random.default_rng([config.seed, it, epoch]).permutation(b)
                for j in range(pc.minibatches):
                    idx = perm[j * mb:(j + 1) * mb]
                    minibatch = trainer.to_device({k: v[idx] for k, v in full.items()},
                                                  batch_sharding)
                    step_key = jax.random.fold_in(key, 1 + epoch * 97 + j)
                    state, m = update_fn(state, minibatch, step_key)
                    if critic is not None:
                        critic, cm = critic_fn(critic, minibatch, jax.random.fold_in(step_key, 1))
                        m = {**m, "value_loss": cm["value_loss"],
                             "value_clip_fraction": cm["value_clip_fraction"],
                             "critic_grad_norm": cm["grad_norm"]}
                    epoch_metrics.append(m)
            epoch_metrics = ptree.to_host(epoch_metrics)
            streak, longest = guard.host_streak(streak, [m["nonfinite"] for m in epoch_metrics])
            t3 = time.perf_counter()
            row = {
                "ppo/score": float(raw_score.mean()), "ppo/kl": kl, "ppo/kl_coef": beta,
                "ppo/response_length": float(ro.response.sum(1).mean()),
                "ppo/prompts": len(prompt_ids),
                "ppo/eos_fraction": float(ro.done.mean()),
                "ppo/explained_variance": float(rl_math.explained_variance(
                    full["old_values"], full["returns"], ro.response)),
                "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2,
                **{f"ppo/{k}": float(np.mean([m[k] for m in epoch_metrics]))
                   for k in epoch_metrics[0] if k != "loss"}}
            if pc.adaptive_kl:
                beta = float(rl_math.adaptive_kl_coef(beta, kl, pc.kl_target, pc.kl_horizon, b))
            log.write(it + 1, row)
            last = row
            bar.set_postfix(score=f"{row['ppo/score']:.3f}", kl=f"{kl:.2f}")
            stop_if_diverged(mngr, log, longest, it + 1, tc.max_bad_steps)
            preempted = preempt.reached(it + 1)  # asked once per iteration, on every process
            if preempted or (it + 1) % config.checkpoint.every == 0 or it + 1 == tc.steps:
                saved = {"policy": state} | ({} if critic is None else {"critic": critic})
                checkpoint.save(mngr, it + 1,
                                {k: trainer.saved_part(s, False) for k, s in saved.items()},
                                {"step": it + 1, "beta": beta, "score_bias": bias,
                                 "score_gain": gain}, run=record)
            stop_if_preempted(preempted, mngr, log, it + 1)
        bar.close()
    checkpoint.finish(mngr, tc.steps)  # a failed background save is raised here
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
    if init_params is None:
        raise ValueError("model.init: PPO starts from a trained policy (an SFT run, a Hugging "
                         "Face folder or a GGUF file)")
    if pc.reward_model:
        rm_params, rm_cfg = reward_recipe.load_reward_model(pc.reward_model)
        scorer = dict(score_tokens=model_scorer(rm_params, rm_cfg, model_cfg),
                      critic_init=(rm_params, rm_cfg))
    else:
        scorer = dict(score_texts=text_scorer(pc.reward_fn))
    return train(config, workdir, prompts, tokenizer, init_params, model_cfg, **scorer)

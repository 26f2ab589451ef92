"""Objective-guided soft prompts: steer a frozen model by optimizing only its input.

An objective is a pure function `objective(params, prompt_params, batch) -> scalar`, higher
is better: the model's parameters are a plain argument that is never differentiated, and
`prompt_params` is what `optimize` trains by gradient ascent (optax), as one jitted
`lax.scan`. `prompt_params` holds what `ptjax.peft.prompts` knows how to place: `prompt/
embeddings` [n, hidden] (n virtual tokens in front of everything, BOS included, where PEFT's
prompt tuning puts them) and/or `prefix/embeddings` [n, layers*2*kv_dim] (per-layer keys and
values). The model never changes: `{**params, **prompt_params}` is a new dict over the same
arrays, so sampling with the result is `sampling.generate` with virtual-token slots.

Objectives provided: the log-likelihood of target strings given their contexts (teacher
forced); a reward model's (or any scorer's) expected score over a fixed set of candidate
completions per context, under the model's own distribution restricted to them (teacher
forced, exact gradient); and its expected score over completions the model samples (the
score-function gradient with a mean baseline). Any user function with the signature works.

Discrete prompts (`relax_discrete`): per prompt position, logits over the vocabulary; a
Gumbel-softmax sample with a straight-through estimator (a hard one-hot forward, the soft
sample's gradient), its temperature annealed over the run, picks the embedding row. Its argmax
is a real token string. A continuous prompt can also be projected onto its nearest token
embeddings (`nearest_tokens`); both are scored with the same objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptjax import sampling
from ptjax.data import SFTRecord, encode_prompt, encode_sft
from ptjax.models import llama
from ptjax.peft import prompts
from ptjax.train import policy, rl_math

F32 = jnp.float32


# ----------------------------------------------------------------------------- placement


def prompt_length(prompt_params) -> int:
    """n, the number of virtual tokens `prompt_params` puts in front of the text (0 with only
    a prefix)."""
    if "prompt" not in prompt_params:
        return 0
    return int(prompts.virtual_tokens(prompt_params["prompt"]).shape[0])


def prompt_slots(n: int) -> np.ndarray:
    """The ids -1..-n that mark n virtual-token slots (`ptjax.peft.prompts`' convention)."""
    return -np.arange(1, n + 1, dtype=np.int32)


def with_slots(tokens, mask, n: int):
    """`tokens` [b, s] and `mask` with n virtual-token slots in front of every row."""
    b = tokens.shape[0]
    slots = jnp.broadcast_to(jnp.asarray(prompt_slots(n)), (b, n))
    return (jnp.concatenate([slots, jnp.asarray(tokens, jnp.int32)], axis=1),
            jnp.concatenate([jnp.ones((b, n), jnp.int32), jnp.asarray(mask, jnp.int32)], axis=1))


def hidden(params, cfg, prompt_params, tokens, mask):
    """(final hidden states [b, s, hidden] aligned with `tokens`, the merged params) of one
    example per row with the soft prompt and/or prefix of `prompt_params` placed as the
    sampler places it (positions counting real tokens and virtual slots only)."""
    merged = {**params, **prompt_params}
    n = prompt_length(prompt_params)
    toks, msk = with_slots(tokens, mask, n)
    embeds, positions, prefix = prompts.model_inputs(merged, cfg, toks,
                                                     sampling.positions_from_mask(msk))
    h = llama.hidden_states(merged, cfg, embeds, positions, msk, prefix=prefix)
    return h[:, n:], merged


def token_logprobs(params, cfg, prompt_params, tokens, mask, temperature: float = 1.0):
    """log p(tokens[:, t] | soft prompt, tokens[:, :t]) [b, s] (0 at t = 0), under the
    sampling `temperature`'s distribution."""
    h, merged = hidden(params, cfg, prompt_params, tokens, mask)
    return policy.shifted_logprobs(merged, cfg, h, tokens, temperature)[0]


# ----------------------------------------------------------------------------- objectives


def target_log_likelihood(cfg):
    """Objective: mean log-probability per target token of `batch["tokens"]` [b, s] where
    `batch["target"]` is set (`target_batch`), given the soft prompt and the tokens before.

    Why per token: the value reads as an average log-probability, comparable across batches."""
    def objective(params, prompt_params, batch):
        logp = token_logprobs(params, cfg, prompt_params, batch["tokens"], batch["mask"])
        target = jnp.asarray(batch["target"], F32)
        return jnp.sum(logp * target) / jnp.maximum(jnp.sum(target), 1.0)

    return objective


def candidate_reward(cfg, candidates: int):
    """Objective: the expected reward of a context's completion when the model chooses among
    `candidates` fixed completions in proportion to their likelihood, averaged over contexts.

    `batch` is a `target_batch` of contexts x candidates rows (each context's candidates
    consecutive) plus `reward` [rows], the judge's score of each row (a reward model's, a
    classifier head's, a Python function's), computed once: the judge is not steered. Teacher
    forced and exact: softmax over a context's candidates of sum log p(completion) weights
    their rewards, and the gradient is that of the closed form.
    """
    def objective(params, prompt_params, batch):
        logp = token_logprobs(params, cfg, prompt_params, batch["tokens"], batch["mask"])
        seq = rl_math.sequence_logps(logp, batch["target"]).reshape(-1, candidates)
        reward = jnp.asarray(batch["reward"], F32).reshape(-1, candidates)
        return jnp.mean(jnp.sum(jax.nn.softmax(seq, axis=-1) * reward, axis=-1))

    return objective


def sampled_reward(cfg, reward_fn, *, max_new_tokens: int, temperature: float = 1.0,
                   eos_id=2, pad_id: int = 0):
    """Objective: the mean reward of completions sampled with the soft prompt, for contexts
    `batch["tokens"]`/`batch["mask"]` [b, p] (left-padded: `context_batch`), with the
    score-function gradient: mean((r - mean r) * grad log p(completion)).

    `reward_fn(tokens, mask, response) -> [b]` scores the plain text (no soft prompt): the
    contexts followed by the completions, `response` marking the completion tokens (EOS
    included), e.g. `functools.partial(reward.scores, rm_params, rm_cfg)`. Its value is the
    sample mean, so it is noisy; `batch["key"]` (set by `optimize`) seeds the samples.
    """
    def objective(params, prompt_params, batch):
        context, context_mask = batch["tokens"], jnp.asarray(batch["mask"], jnp.int32)
        n = prompt_length(prompt_params)
        frozen_prompt = jax.lax.stop_gradient(prompt_params)
        slotted, slotted_mask = with_slots(context, context_mask, n)
        out = sampling.generate({**params, **frozen_prompt}, cfg, slotted, slotted_mask,
                                batch["key"], max_new_tokens=max_new_tokens,
                                temperature=temperature, eos_id=eos_id, pad_id=pad_id)
        steps = jnp.arange(max_new_tokens)
        response = (steps[None, :] < out["lengths"][:, None]).astype(jnp.int32)
        tokens = jnp.concatenate([context, out["tokens"]], axis=1)
        mask = jnp.concatenate([context_mask, response], axis=1)
        in_response = jnp.concatenate([jnp.zeros_like(context_mask), response], axis=1)
        reward = jax.lax.stop_gradient(jnp.asarray(reward_fn(tokens, mask, in_response), F32))
        logp = token_logprobs(params, cfg, prompt_params, tokens, mask, temperature)
        seq = rl_math.sequence_logps(logp, in_response)
        advantage = reward - jnp.mean(reward)
        return jnp.mean(reward) + jnp.mean(advantage * (seq - jax.lax.stop_gradient(seq)))

    return objective


# ----------------------------------------------------------------------------- batches


def target_batch(tokenizer, contexts: list[str], targets: list[str], length: int = 0) -> dict:
    """`{"tokens", "mask", "target"}` [b, length] for `target_log_likelihood`/`candidate_reward`:
    each context + target (+ EOS) encoded as SFT examples are, right-padded; `target` marks the
    target's tokens and the EOS. `length` 0 fits the longest row."""
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    rows = [encode_sft(SFTRecord(c, t), tokenizer, 1 << 20) for c, t in zip(contexts, targets)]
    length = length or max(len(ids) for ids, _ in rows)
    tokens = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    target = np.zeros((len(rows), length), bool)
    for i, (ids, loss) in enumerate(rows):
        if len(ids) > length:
            raise ValueError(f"row {i} has {len(ids)} tokens, more than length={length}")
        tokens[i, :len(ids)], mask[i, :len(ids)], target[i, :len(ids)] = ids, True, loss
    return {"tokens": tokens, "mask": mask, "target": target}


def context_batch(tokenizer, contexts: list[str]) -> dict:
    """`{"tokens", "mask"}` [b, p]: contexts encoded as generation prompts, left-padded (the
    sampler's layout), for `sampled_reward`."""
    encoded = [encode_prompt(c, tokenizer) for c in contexts]
    tokens, mask = sampling.left_pad(encoded, max(len(e) for e in encoded), tokenizer.pad_id)
    return {"tokens": tokens, "mask": mask}


# ----------------------------------------------------------------------------- optimization


def init_prompt(params, cfg, key, *, n: int, init: str = "vocab", text_ids=None) -> dict:
    """`{"prompt": {"embeddings": [n, hidden]}}`, initialized as prompt tuning is
    (`prompts.init_prompt_tuning`: sampled vocabulary rows, a text's embeddings, or random)."""
    full = prompts.init_prompt_tuning(params, cfg, key, n=n, init=init, text_ids=text_ids)
    return {"prompt": full["prompt"]}


def optimize(objective, params, prompt_params, batch: dict, *, steps: int,
             learning_rate: float = 1e-2, key=None, optimizer=None):
    """(optimized prompt_params, objective value at each step [steps]) after `steps` steps of
    gradient ascent on `objective` over `prompt_params` alone.

    The whole loop is one jitted `lax.scan` (compiled once). `params` goes in as an ordinary
    argument and no gradient is taken with respect to it, so the model's arrays are neither
    updated nor donated. Each step's batch gets `key` (folded with the step) and `step`, which
    sampled objectives and `relax_discrete` read. `optimizer` defaults to Adam at
    `learning_rate`.
    """
    tx = optimizer or optax.adam(learning_rate)
    key = jax.random.key(0) if key is None else key

    def run(params, prompt_params, batch, key):
        def step_fn(carry, step):
            current, opt_state = carry
            b = {**batch, "key": jax.random.fold_in(key, step), "step": step}
            value, grad = jax.value_and_grad(lambda pp: objective(params, pp, b))(current)
            updates, opt_state = tx.update(jax.tree.map(jnp.negative, grad), opt_state, current)
            return (optax.apply_updates(current, updates), opt_state), value

        (final, _), values = jax.lax.scan(step_fn, (prompt_params, tx.init(prompt_params)),
                                          jnp.arange(steps))
        return final, values

    return jax.jit(run)(params, prompt_params, batch, key)


def evaluate(objective, params, prompt_params, batch: dict, key=None) -> float:
    """The objective's value for `prompt_params` (jitted; `key` for sampled objectives)."""
    b = {**batch, "key": jax.random.key(0) if key is None else key,
         "step": jnp.zeros((), jnp.int32)}
    return float(jax.jit(objective)(params, prompt_params, b))


# ----------------------------------------------------------------------------- discrete prompts


def init_discrete(cfg, key, *, n: int, scale: float = 0.01) -> dict:
    """`{"logits": [n, vocab]}`: near-uniform choice over the vocabulary at each position."""
    return {"logits": scale * jax.random.normal(key, (n, cfg.vocab_size), F32)}


def relax_discrete(objective, *, steps: int, start_temperature: float = 2.0,
                   end_temperature: float = 0.1, allowed=None):
    """`objective` as a function of per-position vocabulary logits `{"logits": [n, vocab]}`
    through a straight-through Gumbel-softmax: the forward pass sees the embedding rows of a
    hard Gumbel-max sample, the gradient is the soft sample's, and the temperature falls
    geometrically from `start_temperature` to `end_temperature` over `steps` (read from
    `batch["step"]`). `allowed` [vocab] bool limits the tokens (e.g. no special ids).

    Why straight-through: the model only ever sees real token embeddings, so the optimized
    distribution's argmax (`discrete_tokens`) keeps most of what was learned, while the soft
    relaxation gives every token a gradient.
    """
    allowed = None if allowed is None else np.asarray(allowed, bool)

    def relaxed(params, prompt_params, batch):
        logits = prompt_params["logits"]
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        progress = jnp.minimum(batch["step"] / max(steps - 1, 1), 1.0)
        tau = start_temperature * (end_temperature / start_temperature) ** progress
        noise_key, inner_key = jax.random.split(batch["key"])
        soft = jax.nn.softmax((logits + jax.random.gumbel(noise_key, logits.shape)) / tau)
        hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
        choice = hard + soft - jax.lax.stop_gradient(soft)
        table = params["embed"]["embedding"].astype(F32)
        rest = {k: v for k, v in prompt_params.items() if k != "logits"}
        return objective(params, {**rest, "prompt": {"embeddings": choice @ table}},
                         {**batch, "key": inner_key})

    return relaxed


def discrete_tokens(prompt_params, allowed=None) -> np.ndarray:
    """The most likely token at each position of a `relax_discrete` prompt, int32 [n]."""
    logits = np.asarray(prompt_params["logits"])
    if allowed is not None:
        logits = np.where(np.asarray(allowed, bool), logits, -np.inf)
    return logits.argmax(axis=-1).astype(np.int32)


def nearest_tokens(params, embeddings, metric: str = "cosine", allowed=None) -> np.ndarray:
    """int32 [n]: for each continuous prompt vector, the vocabulary row nearest to it, by
    cosine similarity or L2 distance (`metric`)."""
    table = np.asarray(params["embed"]["embedding"], np.float64)
    vectors = np.asarray(embeddings, np.float64)
    if metric == "cosine":
        unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        score = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
                 ) @ unit.T
    elif metric == "l2":
        score = -(np.sum(vectors**2, 1)[:, None] - 2 * vectors @ table.T + np.sum(table**2, 1))
    else:
        raise ValueError(f"unknown metric {metric!r}; choose cosine or l2")
    if allowed is not None:
        score = np.where(np.asarray(allowed, bool), score, -np.inf)
    return score.argmax(axis=1).astype(np.int32)


def token_prompt(params, ids) -> dict:
    """`{"prompt": {"embeddings": table[ids]}}`: a discrete prompt in the soft-prompt slots,
    identical to putting those tokens in front of the text."""
    table = params["embed"]["embedding"]
    return {"prompt": {"embeddings": jnp.asarray(table, F32)[jnp.asarray(ids)]}}


# ----------------------------------------------------------------------------- generation


def generate_text(params, cfg, tokenizer, prompt_params, texts: list[str], *,
                  max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                  batch_size: int = 32) -> list[str]:
    """Completions of `texts` with the soft prompt (and/or prefix) in front, strings in and out,
    through the ordinary sampler (`sampling.generate_from_ids`)."""
    slots = prompt_slots(prompt_length(prompt_params))
    encoded = [np.concatenate([slots, encode_prompt(t, tokenizer)]) for t in texts]
    return sampling.generate_from_ids({**params, **prompt_params}, cfg, tokenizer, encoded,
                                      max_new_tokens=max_new_tokens, temperature=temperature,
                                      seed=seed, batch_size=batch_size)

"""PPO: the sampler's log-probs equal a full forward over the finished sequences, the LoRA
reference is the same base (one copy), and a few iterations raise a programmatic reward with
KL finite; rerunning resumes."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import data as D
from ptjax import peft, sampling
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.recipes import ppo as ppo_recipe
from ptjax.train import failures, policy, ppo, reward
from ptjax.train.config import base_config

CFG = preset("tiny")
TOK = D.ByteTokenizer()


@pytest.mark.slow  # CI keeps tests/test_sampling.py's logprobs against the reference forward
def test_sampler_logprobs_equal_a_full_forward_over_the_finished_rows():
    params = llama.init_params(CFG, jax.random.key(0))
    prompts = [TOK.encode("abc"), TOK.encode("hello w"), TOK.encode("z")]
    gen = sampling.make_generate_fn(CFG, 6, temperature=0.7, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    ro = ppo_recipe.rollout(gen, params, [np.asarray(p, np.int32) for p in prompts], TOK,
                            TOK.pad_id, jax.random.key(5), prompt_len=8)
    out = jax.device_get(gen(params, *sampling.left_pad(prompts, 8, TOK.pad_id), jax.random.key(5)))
    lp = np.asarray(policy.token_logprobs(params, CFG, ro.tokens, ro.mask, temperature=0.7))
    np.testing.assert_allclose(lp[:, 8:][ro.response[:, 8:]], out["logprobs"][ro.response[:, 8:]],
                               rtol=1e-4, atol=1e-4)
    params = ppo_recipe.heads.add_head(params, CFG, jax.random.key(1), name=ppo.VALUE_HEAD)
    lp2, _, values = ppo.logprobs_and_values(params, CFG, jnp.asarray(ro.tokens),
                                             jnp.asarray(ro.mask), 0.7)
    np.testing.assert_allclose(np.asarray(lp2)[ro.response], lp[ro.response], rtol=1e-5, atol=1e-5)
    assert values.shape == ro.tokens.shape


def test_lora_reference_is_the_same_base_arrays():
    """One copy of the base: the reference (adapters off) holds exactly the policy's base arrays,
    none duplicated, and computes the base model's log-probs."""
    base = llama.init_params(CFG, jax.random.key(0))
    c = base_config()
    c.peft.method = "lora"
    params, _ = peft.apply(base, CFG, c.peft, jax.random.key(1))
    params = jax.tree.map(lambda x: x, params)
    params = ptree.map_with_path(lambda p, x: x + 0.1 if p.endswith("/b") else x, params)
    ref = policy.adapters_off(params)
    policy_ids = {id(x) for x in jax.tree.leaves(params)}
    ref_leaves = jax.tree.leaves(ref)
    assert all(id(x) in policy_ids for x in ref_leaves)
    assert len({id(x) for x in ref_leaves}) == len(ref_leaves) == len(jax.tree.leaves(base))
    assert policy.has_adapters(params) and not policy.has_adapters(ref)
    tokens = jnp.asarray([TOK.encode("abcdefgh")], jnp.int32)
    mask = jnp.ones_like(tokens)
    np.testing.assert_allclose(policy.token_logprobs(ref, CFG, tokens, mask),
                               policy.token_logprobs(base, CFG, tokens, mask), rtol=1e-5, atol=1e-6)
    assert not np.allclose(policy.token_logprobs(params, CFG, tokens, mask),
                           policy.token_logprobs(base, CFG, tokens, mask), atol=1e-3)


def even_fraction(tokens, mask, response=None):
    """The programmatic reward: the share of even token ids among the response tokens (the
    last 8 columns)."""
    resp, m = tokens[:, -8:], mask[:, -8:]
    return ((resp % 2 == 0) * m).sum(1) / np.maximum(m.sum(1), 1)


def _config(steps, method="full"):
    import ml_collections

    from configs.ppo import ppo_defaults

    c = base_config()
    c.trainer = "ppo"
    c.model.preset = "tiny"
    c.peft.method = method
    # The tiny random model's head is too small to make any distribution peaked: adapt it too.
    c.peft.targets = r"(layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))|lm_head)/kernel$"
    c.train.update(steps=steps, batch_size=16)
    c.optim.update(lr=1e-2 if method == "full" else 3e-2, warmup_steps=0, final_lr_fraction=1.0)
    c.checkpoint.update(every=4, async_save=False)
    c.ppo = ppo_defaults()
    c.ppo.update(max_new_tokens=8, temperature=1.0, epochs=4, minibatches=2, kl_coef=0.02,
                 missing_eos_penalty=0.0)
    c.ppo = ml_collections.ConfigDict(c.ppo.to_dict())
    return c


def test_ppo_raises_a_programmatic_reward_and_resumes(tmp_path):
    prompts = [f"q{i}: " for i in range(32)]
    workdir = str(tmp_path / "ppo")
    params = llama.init_params(CFG, jax.random.key(0))
    first = _config(4)
    first.ppo.prompt_filter_samples = 2
    ppo_recipe.train(first, workdir, prompts, TOK, params, CFG, score_tokens=even_fraction,
                     show_progress=False)
    with pytest.raises(failures.ResumeMismatch, match="train.steps: 4 -> 8"):
        ppo_recipe.train(_config(8), workdir, prompts, TOK, params, CFG,
                         score_tokens=even_fraction, show_progress=False)
    longer = _config(8)
    longer.ppo.prompt_filter_samples = 2
    longer.checkpoint.allow_changes = "train.steps"  # extending the run is meant
    ppo_recipe.train(longer, workdir, prompts, TOK, params, CFG, score_tokens=even_fraction,
                     show_progress=False)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "ppo/score" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))  # resumed at 4, nothing repeated
    scores = [r["ppo/score"] for r in rows]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    assert all(np.isfinite(r["ppo/kl"]) for r in rows) and rows[-1]["ppo/kl"] > 0
    # the random starting policy never answers a prompt the same twice: the filter keeps all
    assert {r["ppo/prompts"] for r in rows} == {32}
    for key in ("ppo/kl_coef", "ppo/entropy", "ppo/clip_fraction", "ppo/approx_kl",
                "ppo/value_loss", "ppo/explained_variance", "ppo/response_length",
                "time/generate_s", "time/score_s", "time/train_s"):
        assert key in rows[-1]
    assert os.path.exists(os.path.join(workdir, "ppo.png"))


@pytest.mark.slow
def test_lora_ppo_raises_the_reward_with_the_base_frozen(tmp_path):
    prompts = [f"q{i}: " for i in range(32)]
    params = llama.init_params(CFG, jax.random.key(0))
    result = ppo_recipe.train(_config(8, "lora"), str(tmp_path / "lora"), prompts, TOK, params,
                              CFG, score_tokens=even_fraction, show_progress=False)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "lora", "metrics.jsonl"))]
    scores = [r["ppo/score"] for r in rows if "ppo/score" in r]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.05, scores
    base_after = policy.adapters_off(result.params)
    for path, x in ptree.flatten_with_paths(base_after):
        np.testing.assert_array_equal(np.asarray(x, np.float32),
                                      np.asarray(dict(ptree.flatten_with_paths(params))[path],
                                                 np.float32), err_msg=path)


def test_value_loss_trains_the_head_only():
    """The value head reads the body through a stop-gradient: the value loss's gradient is zero
    on every body parameter and nonzero on the head (the policy loss still reaches the body)."""
    params = ppo_recipe.heads.add_head(llama.init_params(CFG, jax.random.key(0)), CFG,
                                       jax.random.key(1), name=ppo.VALUE_HEAD)
    tokens = jnp.asarray([TOK.encode("abcdefgh")], jnp.int32)
    mask = jnp.ones_like(tokens)

    def value_part(p):
        return jnp.sum(ppo.logprobs_and_values(p, CFG, tokens, mask, 1.0)[2] ** 2)

    def policy_part(p):
        return jnp.sum(ppo.logprobs_and_values(p, CFG, tokens, mask, 1.0)[0])

    grads = jax.grad(value_part)(params)
    for path, g in ptree.flatten_with_paths(grads):
        if path.startswith(ppo.VALUE_HEAD):
            assert np.abs(np.asarray(g)).max() > 0, path
        else:
            assert not np.asarray(g).any(), path
    body = jax.grad(policy_part)(params)["layers_0"]["attn"]["q"]["kernel"]
    assert np.abs(np.asarray(body)).max() > 0


def test_separate_critic_starts_from_the_reward_model_and_trains_its_body():
    """`critic_start` turns a reward model into the critic (its score head becomes the value
    head, nothing else changes), and the value loss's gradient reaches the critic's body."""
    rm = ppo_recipe.heads.add_head(llama.init_params(CFG, jax.random.key(2)), CFG,
                                   jax.random.key(3), name="score_head")
    critic, cfg = ppo_recipe.critic_start((rm, CFG), llama.init_params(CFG, jax.random.key(0)),
                                          CFG)
    assert cfg is CFG and "score_head" not in critic
    assert set(critic[ppo.VALUE_HEAD]) == {"kernel", "bias"}
    assert all(critic[ppo.VALUE_HEAD][k] is rm["score_head"][k] for k in ("kernel", "bias"))
    # a reward model's likelihood scale is part of its score, not of the value head
    with_scale = ppo_recipe.critic_start((reward.add_likelihood_scale(rm), CFG), None, CFG)[0]
    assert set(with_scale[ppo.VALUE_HEAD]) == {"kernel", "bias"}
    assert critic["layers_0"] is rm["layers_0"]
    tokens = jnp.asarray([TOK.encode("abcdefgh")], jnp.int32)
    mask = jnp.ones_like(tokens)
    values = ppo.critic_values(critic, CFG, tokens, mask)
    h = policy.hidden(critic, CFG, tokens, mask)
    head = rm["score_head"]
    np.testing.assert_allclose(np.asarray(values)[0, 1:],
                               np.asarray(h[0, :-1] @ head["kernel"] + head["bias"])[:, 0],
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(ppo.critic_values(p, CFG, tokens, mask) ** 2))(critic)
    assert np.abs(np.asarray(grads["layers_0"]["attn"]["q"]["kernel"])).max() > 0
    fresh, _ = ppo_recipe.critic_start(None, {**rm, ppo.VALUE_HEAD: rm["score_head"]}, CFG)
    assert ppo.VALUE_HEAD not in fresh  # the policy's own value head is not reused


@pytest.mark.slow  # 28 s; the shared-critic learning-and-resume test runs in CI
def test_ppo_with_a_separate_critic_raises_the_reward_and_resumes(tmp_path):
    """`ppo.critic=separate`: the policy has no value head, the critic is trained (its body
    moves) and checkpointed with the policy, and a rerun resumes both (and the score
    normalization)."""
    prompts = [f"q{i}: " for i in range(32)]
    workdir = str(tmp_path / "ppo")
    params = llama.init_params(CFG, jax.random.key(0))

    def config(steps):
        c = _config(steps)
        c.ppo.update(critic="separate", critic_lr=1e-2, score_normalization_samples=32)
        c.checkpoint.allow_changes = "train.steps"  # the second call extends the run
        return c

    first = ppo_recipe.train(config(4), workdir, prompts, TOK, params, CFG,
                             score_tokens=even_fraction, show_progress=False)
    assert ppo.VALUE_HEAD not in first.params
    result = ppo_recipe.train(config(8), workdir, prompts, TOK, params, CFG,
                              score_tokens=even_fraction, show_progress=False)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "ppo/score" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    scores = [r["ppo/score"] for r in rows]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    assert all(r["ppo/critic_grad_norm"] > 0 and np.isfinite(r["ppo/value_loss"]) for r in rows)
    assert ppo.VALUE_HEAD not in result.params
    # The checkpoint holds the critic beside the policy; its body has moved from the start.
    import orbax.checkpoint as ocp

    mngr = ppo_recipe.checkpoint.manager(workdir, async_save=False)
    restored = mngr.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                       data=ocp.args.JsonRestore()))
    first_data = mngr.restore(4, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    mngr.close()
    saved, data = restored["state"], restored["data"]
    # The score normalization is computed once, before the first update, and kept on resume.
    assert data["score_gain"] != 1.0 and data["score_bias"] != 0.0
    assert (data["score_gain"], data["score_bias"]) == (first_data["score_gain"],
                                                        first_data["score_bias"])
    assert set(saved) == {"policy", "critic"}
    critic_q = np.asarray(saved["critic"]["trainable"]["layers_0"]["attn"]["q"]["kernel"])
    assert not np.allclose(critic_q, np.asarray(params["layers_0"]["attn"]["q"]["kernel"]))
    assert ppo.VALUE_HEAD in saved["critic"]["trainable"]
    assert ppo.VALUE_HEAD not in saved["policy"]["trainable"]


def test_prompt_filter_keeps_the_prompts_whose_sampled_responses_differ():
    """`prompts_with_varied_responses` samples every prompt `samples` times in batches (the
    last batch wrapping to the first prompts) and keeps exactly the prompts that got more than
    one distinct response; what the wrapped rows got does not count for their prompts."""
    calls = []

    def sample(ids, i):
        calls.append((i, list(ids)))
        k = i // 10  # the sample's number: index = k * n + batch start
        # prompts 0, 3, 6, 9 always get "same"; the others a response that changes with k,
        # except in wrapped rows (position >= the batch's real prompts), which would vary too
        return types.SimpleNamespace(responses=[
            "same" if p % 3 == 0 and pos < 10 - i % 10 else f"r{p}-{k}-{pos}"
            for pos, p in enumerate(ids)])

    kept = ppo_recipe.prompts_with_varied_responses(sample, list(range(10)), 3, 4)
    assert kept == [1, 2, 4, 5, 7, 8]
    assert [i for i, _ in calls] == [0, 4, 8, 10, 14, 18, 20, 24, 28]
    assert calls[2][1] == [8, 9, 0, 1]  # the last batch wraps
    # one sample per prompt can never disagree with itself
    assert ppo_recipe.prompts_with_varied_responses(sample, list(range(10)), 1, 4) == []


def test_score_normalization_gives_the_starting_scores_mean_0_std_1():
    """`score_normalization` scores `n` prompts in batches (cycling when there are fewer) and
    returns the bias and gain that standardize exactly those scores (numpy float64)."""
    rng = np.random.default_rng(0)
    table = rng.normal(3.0, 5.0, size=10)
    seen = []

    def sample(ids, i):
        seen.append((i, list(ids)))
        return ids

    bias, gain = ppo_recipe.score_normalization(lambda ids: table[np.asarray(ids)], sample,
                                                list(range(10)), 12, 4)
    assert [i for i, _ in seen] == [0, 4, 8] and seen[-1][1] == [8, 9, 0, 1]
    expected = table[[j % 10 for j in range(12)]].astype(np.float64)
    np.testing.assert_allclose(bias, -expected.mean(), rtol=1e-6)
    np.testing.assert_allclose(gain, 1.0 / expected.std(), rtol=1e-6)
    normalized = (expected + bias) * gain
    np.testing.assert_allclose([normalized.mean(), normalized.std()], [0.0, 1.0], atol=1e-6)

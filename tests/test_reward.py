"""Reward modeling: pair batches, the Bradley-Terry step against numpy, and a trained model that
separates a separable preference set, exported and read back."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import data as D
from ptjax.data import pairs as P
from ptjax.models import heads, llama
from ptjax.models.config import preset
from ptjax.recipes import reward as reward_recipe
from ptjax.train import reward

CFG = preset("tiny")
TOK = D.ByteTokenizer()


def _records(n, seed):
    """Prompts of random letters; the chosen answer ends in '!', the rejected one in '?'."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(list("abcdef"), rng.integers(2, 6)))
        answer = "".join(rng.choice(list("xyz"), rng.integers(1, 4)))
        out.append(D.PreferenceRecord(f"Q: {word}\nA: ", answer + "!", answer + "?"))
    return out


def test_pair_batch_holds_each_side_as_encode_sft_lays_it_out():
    records = _records(3, 0)
    pairs = [P.encode_pair(r, TOK, 32) for r in records]
    batch = P.pair_batch(pairs, 32, batch_size=4)
    for i, r in enumerate(records):
        for side in P.SIDES:
            ids, mask = D.encode_sft(D.SFTRecord(r.prompt, getattr(r, side)), TOK, 32)
            n = len(ids)
            np.testing.assert_array_equal(batch[f"{side}_tokens"][i, :n], ids)
            np.testing.assert_array_equal(batch[f"{side}_response"][i, :n], mask)
            assert batch[f"{side}_mask"][i].sum() == n and not batch[f"{side}_tokens"][i, n:].any()
    np.testing.assert_array_equal(batch["weight"], [1, 1, 1, 0])
    assert not batch["chosen_mask"][3].any()


def test_pair_batches_resume_the_same_stream():
    pairs = [P.encode_pair(r, TOK, 32) for r in _records(10, 1)]
    a = P.PairBatches(pairs, 32, 4, seed=3)
    seen = [next(a) for _ in range(5)]  # 2 batches per epoch: crosses two epoch boundaries
    b = P.PairBatches(pairs, 32, 4, seed=3)
    b.restore({"step": 3})
    for want in seen[3:]:
        got = next(b)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_eval_step_equals_numpy_bradley_terry_on_unpadded_sequences():
    """Scores from one forward per unpadded sequence (no padding anywhere), loss and accuracy in
    float64 numpy, against the padded, batched eval step."""
    params = heads.add_head(llama.init_params(CFG, jax.random.key(0)), CFG, jax.random.key(1),
                            name=reward.HEAD)
    params[reward.HEAD]["bias"] = jnp.array([0.3])
    pairs = [P.encode_pair(r, TOK, 32) for r in _records(3, 2)]
    batch = P.pair_batch(pairs, 32, batch_size=4)
    got = jax.device_get(jax.jit(lambda p, b: reward.eval_step(p, b, model_cfg=CFG))(params, batch))

    def score(ids):
        h = llama.hidden_states(params, CFG, llama.embed_tokens(params, CFG, jnp.asarray(ids)[None]),
                                jnp.arange(len(ids))[None], jnp.ones((1, len(ids)), jnp.int32))
        head = params[reward.HEAD]
        return float(np.asarray(h[0, -1], np.float64) @ np.asarray(head["kernel"], np.float64)[:, 0]
                     + float(head["bias"][0]))

    diff = np.array([score(c[0]) - score(r[0]) for c, r in pairs])
    assert got["pairs"] == 3
    np.testing.assert_allclose(got["loss"], np.sum(np.log1p(np.exp(-diff))), rtol=1e-4)
    np.testing.assert_allclose(got["margin"], diff.sum(), rtol=1e-4, atol=1e-5)
    assert got["correct"] == np.sum(diff > 0)


def test_likelihood_term_adds_the_scaled_response_log_probs():
    """With `likelihood_scale` in the head, a pair's score is the head's value plus the scale
    times log p(response + EOS | prompt), both from one unpadded forward per sequence in
    float64 numpy; the padded, batched `pair_scores` must match, prompt tokens excluded."""
    params = heads.add_head(llama.init_params(CFG, jax.random.key(0)), CFG, jax.random.key(1),
                            name=reward.HEAD)
    params = reward.add_likelihood_scale(params)
    params[reward.HEAD][reward.LIKELIHOOD] = jnp.array([0.7])
    pairs = [P.encode_pair(r, TOK, 32) for r in _records(3, 4)]
    batch = P.pair_batch(pairs, 32, batch_size=4)
    chosen, rejected = jax.device_get(jax.jit(
        lambda p, b: reward.pair_scores(p, CFG, b))(params, batch))

    def score(ids, response):
        x = jnp.asarray(ids)[None]
        h = llama.hidden_states(params, CFG, llama.embed_tokens(params, CFG, x),
                                jnp.arange(len(ids))[None], jnp.ones((1, len(ids)), jnp.int32))
        logits = np.asarray(llama.logits_from_hidden(params, CFG, h)[0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        ll = sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if response[t])
        head = params[reward.HEAD]
        value = (np.asarray(h[0, -1], np.float64) @ np.asarray(head["kernel"], np.float64)[:, 0]
                 + float(head["bias"][0]))
        return value + 0.7 * ll

    for i, (c, r) in enumerate(pairs):
        np.testing.assert_allclose(chosen[i], score(*c), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rejected[i], score(*r), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pass the response mask"):
        reward.scores(params, CFG, batch["chosen_tokens"], batch["chosen_mask"])


# The head-only case is slow-marked: the demo trains with the likelihood term.
@pytest.mark.parametrize("likelihood", [pytest.param(False, marks=pytest.mark.slow), True])
def test_reward_model_separates_a_separable_set_and_round_trips(tmp_path, likelihood):
    path = tmp_path / "prefs.jsonl"
    D.write_jsonl(path, [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
                         for r in _records(200, 4)])
    from ptjax.train.config import base_config

    c = base_config()
    c.model.preset = "tiny"
    c.data.train = str(path)
    c.train.update(steps=40, batch_size=16, seq_len=32, log_every=20)
    c.eval.update(every=40, max_batches=4)
    c.optim.update(lr=5e-3, warmup_steps=5)
    c.checkpoint.update(every=40, async_save=False)
    import ml_collections

    c.reward = ml_collections.ConfigDict({"center_coef": 0.0, "eval_fraction": 0.2,
                                          "likelihood": likelihood})
    workdir = str(tmp_path / "rm")
    result = reward_recipe.run(c, workdir)
    assert (reward.LIKELIHOOD in result.params[reward.HEAD]) == likelihood
    summary = json.load(open(os.path.join(workdir, "summary.json")))["stages"]["reward_model"]
    assert summary["held_out_pairs"] == 40 and summary["pairwise_accuracy"] >= 0.95, summary

    params, cfg = reward_recipe.load_reward_model(os.path.join(workdir, "reward_model"))
    assert set(params[reward.HEAD]) == set(result.params[reward.HEAD])  # the scale comes back
    batch = P.pair_batch([P.encode_pair(r, TOK, 32) for r in _records(4, 9)], 32)
    want = reward.pair_scores(result.params, CFG, batch)
    got = reward.pair_scores(params, cfg, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

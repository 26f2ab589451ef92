"""GRPO / RLOO: weighted text rewards, group advantages over consecutive completions, and a
few iterations that raise a programmatic reward (with the KL term on, reference adapters-off or
a frozen copy)."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from ptjax import data as D
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.recipes import grpo as grpo_recipe
from ptjax.train import grpo
from ptjax.train.config import base_config

CFG = preset("tiny")
TOK = D.ByteTokenizer()


def vowel_share(prompt, response):
    """A text reward for the tests: the share of response characters that are vowels."""
    return sum(ch in "aeiou" for ch in response) / max(len(response), 1)


def length_penalty(prompt, response):
    return -len(response) / 10


def test_weighted_text_rewards_and_group_advantages():
    names, score = grpo_recipe.weighted_text_rewards(
        "test_grpo:vowel_share, test_grpo:length_penalty", (2.0, 0.5))
    parts = score(["p", "p"], ["aab", "xyzw"])
    np.testing.assert_allclose(parts, [[2 * 2 / 3, 0.0], [0.5 * -0.3, 0.5 * -0.4]], rtol=1e-6)
    assert names == ["test_grpo:vowel_share", "test_grpo:length_penalty"]
    with pytest.raises(ValueError, match="grpo.reward_weights"):
        grpo_recipe.weighted_text_rewards("test_grpo:vowel_share", (1.0, 2.0))
    r = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    np.testing.assert_allclose(grpo.group_advantages(r, 3, "rloo"),
                               [1 - 2.5, 2 - 2, 3 - 1.5, 0 - 3, 0 - 3, 6 - 0], rtol=1e-6)
    np.testing.assert_allclose(grpo.group_advantages(r, 3, "dr_grpo"), [-1, 0, 1, -2, -2, 4])
    std = np.std([1, 2, 3], ddof=1)
    np.testing.assert_allclose(grpo.group_advantages(r, 3, "grpo")[:3],
                               np.array([-1, 0, 1]) / (std + 1e-4), rtol=1e-5)


def even_fraction(tokens, mask, response=None):
    resp, m = tokens[:, -8:], mask[:, -8:]
    return ((resp % 2 == 0) * m).sum(1) / np.maximum(m.sum(1), 1)


@pytest.mark.parametrize("method,estimator", [
    pytest.param("full", "grpo", marks=pytest.mark.slow),
    pytest.param("lora", "rloo", marks=pytest.mark.slow)])
def test_grpo_raises_a_programmatic_reward(tmp_path, method, estimator):
    from configs.grpo import grpo_defaults

    c = base_config()
    c.trainer = "grpo"
    c.model.preset = "tiny"
    c.peft.method = method
    c.peft.targets = r"(layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))|lm_head)/kernel$"
    c.train.update(steps=10, batch_size=4)
    c.optim.update(lr=1e-2, warmup_steps=0, final_lr_fraction=1.0)
    c.checkpoint.update(every=5, async_save=False)
    c.grpo = grpo_defaults()
    c.grpo.update(group_size=4, max_new_tokens=8, epochs=2, minibatches=2, estimator=estimator,
                  beta=0.02)
    c.grpo = ml_collections.ConfigDict(c.grpo.to_dict())
    workdir = str(tmp_path / "grpo")
    grpo_recipe.train(c, workdir, [f"q{i}: " for i in range(16)], TOK,
                      llama.init_params(CFG, jax.random.key(0)), CFG, score_tokens=even_fraction,
                      show_progress=False)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    scores = [r["grpo/score"] for r in rows if "grpo/score" in r]
    assert len(scores) == 10
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    assert all(np.isfinite(r["grpo/kl"]) for r in rows if "grpo/kl" in r)
    assert os.path.exists(os.path.join(workdir, "grpo.png"))


def _small_grpo_config(steps=6, lr=1e-2):
    from configs.grpo import grpo_defaults

    c = base_config()
    c.trainer = "grpo"
    c.model.preset = "tiny"
    c.peft.method = "lora"
    c.train.update(steps=steps, batch_size=4, log_every=1)
    c.optim.update(lr=lr, warmup_steps=0, final_lr_fraction=1.0)
    c.checkpoint.update(every=4, async_save=False)
    c.grpo = ml_collections.ConfigDict(grpo_defaults().to_dict())
    c.grpo.update(group_size=2, max_new_tokens=4, epochs=1, minibatches=1, beta=0.02)
    return c


def _grpo_scores(c, workdir, score=even_fraction):
    grpo_recipe.train(c, workdir, [f"q{i}: " for i in range(8)], TOK,
                      llama.init_params(CFG, jax.random.key(0)), CFG, score_tokens=score,
                      show_progress=False)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["grpo/score"] for r in rows if "grpo/score" in r}


@pytest.mark.slow  # three GRPO runs and a refused fourth (~40 s on 2 cores)
def test_grpo_sigterm_saves_the_iteration_and_resumes_like_an_uninterrupted_run(tmp_path):
    """SIGTERM during iteration 3 (checkpoints every 4): the loop saves iteration 3, raises
    Preempted, and the rerun gives an uninterrupted run's scores; a changed GRPO hyperparameter
    in the same workdir is refused by name."""
    import signal

    from ptjax.train import failures

    whole = _grpo_scores(_small_grpo_config(), str(tmp_path / "whole"))
    calls = []

    def score_then_sigterm(tokens, mask, response):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler only sets a flag
        return even_fraction(tokens, mask, response)

    workdir = str(tmp_path / "cut")
    with pytest.raises(failures.Preempted, match="saved step 3"):
        _grpo_scores(_small_grpo_config(), workdir, score_then_sigterm)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    changed = _small_grpo_config()
    changed.grpo.clip_eps = 0.3
    with pytest.raises(failures.ResumeMismatch, match="grpo.clip_eps"):
        _grpo_scores(changed, workdir)
    resumed = _grpo_scores(_small_grpo_config(), workdir)
    assert sorted(resumed) == list(range(1, 7))
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)],
                               [whole[s] for s in range(1, 7)], rtol=1e-6)


@pytest.mark.slow
def test_grpo_stops_after_max_bad_steps_of_nonfinite_updates(tmp_path):
    """A reward that turns NaN from iteration 2 on: every update is skipped (the policy keeps
    iteration 1's weights) and the run stops naming the iteration and the last good checkpoint."""
    from ptjax.train import failures

    calls = []

    def nan_after_first(tokens, mask, response):
        calls.append(1)
        out = even_fraction(tokens, mask, response)
        return out if len(calls) == 1 else out * np.nan

    c = _small_grpo_config(steps=10)
    c.checkpoint.every = 1
    c.train.max_bad_steps = 3
    with pytest.raises(failures.NonFiniteError, match=r"up to step 4.*last good checkpoint is step 3"):
        _grpo_scores(c, str(tmp_path / "nan"), nan_after_first)

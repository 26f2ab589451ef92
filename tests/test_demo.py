"""The demo end to end at toy size: every stage runs and the RLHF stages report what
summary.json promises; the graded ranking orders answers."""

import json
import os
import sys

import numpy as np
import pytest

from ptjax import data as D

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs.demo import get_config  # noqa: E402


def test_grade_orders_answers_by_closeness():
    assert D.grade("add", "168", "168") == 0.0
    assert D.grade("add", "170", "168") > D.grade("add", "200", "168") > D.grade("add", "x", "168")
    assert D.grade("reverse", "cba", "cba") == 0.0
    assert D.grade("reverse", "cbx", "cba") == -1.0 > D.grade("reverse", "abc", "cba")
    assert D.edit_distance("kitten", "sitting") == 3 and D.edit_distance("", "ab") == 2


@pytest.mark.slow  # the demo's wiring at toy size (~1 min); the demo itself is README's first command
def test_demo_runs_every_stage(tmp_path):
    from ptjax.recipes import demo

    c = get_config()
    c.model.preset = "tiny"
    c.train.update(seq_len=48, batch_size=8)
    c.demo.update(pretrain_texts=200, sft_examples=200, eval_examples=8)
    c.demo.stages = [("sft", "full", 1e-3, "")]
    c.demo.pretrain.train.steps = 4
    c.demo.sft.train.steps = 4
    r = c.demo.rlhf
    r.update(preference_prompts=64, ppo_prompts=32)
    r.reward_model.train.update(steps=4, batch_size=8)
    r.reward_model.eval.max_batches = 2
    r.ppo.train.update(steps=2, batch_size=16)
    r.ppo.ppo.max_new_tokens = 8
    workdir = str(tmp_path / "demo")
    summary = demo.run(c, workdir)
    rm, ppo = summary["stages"]["reward_model"], summary["stages"]["ppo"]
    assert rm["pairs"] > 0 and 0.0 <= rm["pairwise_accuracy"] <= 1.0
    for key in ("accuracy", "mean_reward", "kl", "iteration_seconds", "accuracy_add"):
        assert key in ppo
    assert np.isfinite(ppo["kl"])
    assert os.path.exists(os.path.join(workdir, "ppo", "ppo.png"))
    assert json.load(open(os.path.join(workdir, "summary.json")))["stages"]["ppo"] == ppo

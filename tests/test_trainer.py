"""The trainer's evaluation against a tiny case computed by hand.

A one-layer model whose blocks are zeroed passes each token's embedding straight to the head, so
its next-token distribution is a table we choose: from token i the successor (i + 1) % 8 has
probability 2/9 and every other token 1/9. Loss, perplexity and accuracy then follow on paper.
"""

import functools
import itertools
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

import optax

import event_files
from ptjax import data as D
from ptjax import sharding
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import ModelConfig, preset
from ptjax.train import optim, sft, trainer
from ptjax.train import state as state_lib
from ptjax.train.config import base_config

V = 8
CFG = ModelConfig(vocab_size=V, hidden=V, mlp=V, layers=1, heads=2, kv_heads=1, head_dim=4,
                  norm_eps=1e-12)


def _params():
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    successor = np.zeros((V, V))
    successor[np.arange(V), (np.arange(V) + 1) % V] = math.log(2.0)
    return {
        # Row t is sqrt(V) e_t: RMS 1, so the final norm leaves it unchanged.
        "embed": {"embedding": jnp.sqrt(float(V)) * jnp.eye(V)},
        "layers_0": {
            "attn_norm": {"scale": jnp.ones(V)},
            "attn": {"q": {"kernel": zeros(V, 8)}, "k": {"kernel": zeros(V, 4)},
                     "v": {"kernel": zeros(V, 4)}, "o": {"kernel": zeros(8, V)}},
            "mlp_norm": {"scale": jnp.ones(V)},
            "mlp": {"gate": {"kernel": zeros(V, V)}, "up": {"kernel": zeros(V, V)},
                    "down": {"kernel": zeros(V, V)}},
        },
        "final_norm": {"scale": jnp.ones(V)},
        "lm_head": {"kernel": jnp.asarray(successor / math.sqrt(V), jnp.float32)},
    }


def test_evaluate_matches_hand_computation():
    # Example 1 predicts 2 (successor of 1), 3 (successor of 2) and 5 (not the successor of 3);
    # example 2 predicts 0 (successor of 7) and 1 (successor of 0); 6 -> 7 is not in the loss.
    ex1 = (np.array([1, 2, 3, 5], np.int32), np.array([0, 1, 1, 1], bool))
    ex2 = (np.array([6, 7, 0, 1], np.int32), np.array([0, 0, 1, 1], bool))
    batches = [D.pack([ex1], 6), D.pack([ex2], 6)]  # two batches: means must be token-weighted
    eval_fn = jax.jit(functools.partial(sft.eval_step, model_cfg=CFG))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = trainer.evaluate(eval_fn, _params(), batches, single)
    loss = (4 * math.log(9 / 2) + math.log(9)) / 5
    np.testing.assert_allclose(got["eval/loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(got["eval/perplexity"], math.exp(loss), rtol=1e-5)
    np.testing.assert_allclose(got["eval/accuracy"], 4 / 5, rtol=1e-6)


def test_evaluate_edge_cases_one_token_none_and_overflow():
    eval_fn = jax.jit(functools.partial(sft.eval_step, model_cfg=CFG))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    one = D.pack([(np.array([3, 4], np.int32), np.array([0, 1], bool))], 6)  # 3 -> 4: 2/9
    got = trainer.evaluate(eval_fn, _params(), [one], single)
    np.testing.assert_allclose(got["eval/loss"], math.log(9 / 2), rtol=1e-5)
    assert got["eval/accuracy"] == 1.0
    none = D.pack([(np.array([3, 4], np.int32), np.array([0, 0], bool))], 6)
    assert trainer.evaluate(eval_fn, _params(), [none], single) == {
        "eval/loss": 0.0, "eval/perplexity": 1.0, "eval/accuracy": 0.0}
    # A confidently wrong model: loss about 200 nats, perplexity capped at exp(50), not inf.
    params = _params()
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * (200 / math.log(2))
    wrong = D.pack([(np.array([3, 7], np.int32), np.array([0, 1], bool))], 6)
    got = trainer.evaluate(eval_fn, params, [wrong], single)
    np.testing.assert_allclose(got["eval/loss"], 200.0, rtol=1e-4)
    assert got["eval/perplexity"] == math.exp(50.0)


def test_train_loop_logs_evaluates_checkpoints_on_schedule(tmp_path, monkeypatch, capfd):
    """Five steps, logging and evaluating every 2 (and at the end), checkpointing every 2. A fake
    clock that advances one second per read makes tokens/s exact: steps in the window x batch x
    sequence length (the first step, which compiles, is left out of its window)."""
    clock = itertools.count(1.0)
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    config = base_config()
    config.model.preset = "tiny"
    config.train.update(steps=5, batch_size=8, seq_len=32, log_every=2)
    config.eval.update(every=2, max_batches=2)
    config.checkpoint.update(every=2, keep=5, async_save=False)
    config.optim.warmup_steps = 2
    tok = D.ByteTokenizer()
    records = D.instruction_records(80, seed=0)
    examples = [D.encode_sft(r, tok, 32) for r in records[:60]]
    held_out = [D.encode_sft(r, tok, 32) for r in records[60:]]
    workdir = str(tmp_path)  # exists already: the run must accept that
    result = trainer.train(config, workdir, examples, held_out, show_progress=True)
    assert "5/5" in capfd.readouterr().err  # the progress bar ran to the end

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 5]
    assert [r["step"] for r in eval_rows] == [2, 4, 5]
    assert [r["train/tokens_per_s"] for r in train_rows] == [1 * 8 * 32, 2 * 8 * 32, 1 * 8 * 32]
    schedule = optim.learning_rate_schedule(config.optim, 5)
    np.testing.assert_allclose([r["train/lr"] for r in train_rows],
                               [schedule(1), schedule(3), schedule(4)], rtol=1e-6)
    assert result.metrics["eval/loss"] == eval_rows[-1]["eval/loss"]
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4, 5]
    assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000
    tags = {tag for tag, _, _ in event_files.scalars(workdir)}
    assert {"train/loss", "train/grad_norm", "eval/loss", "eval/accuracy"} <= tags
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 5


def test_progress_bar_only_when_asked(tmp_path, capfd):
    config = base_config()
    config.model.preset = "tiny"
    config.train.update(steps=1, batch_size=8, seq_len=32)
    config.eval.every = 0
    config.checkpoint.async_save = False
    tok = D.ByteTokenizer()
    examples = [D.encode_sft(r, tok, 32) for r in D.instruction_records(20, seed=0)]
    trainer.train(config, str(tmp_path / "quiet"), examples, show_progress=False)
    assert "1/1" not in capfd.readouterr().err


def test_summary_is_written_whole_and_read_back(tmp_path):
    path = str(tmp_path / "out" / "summary.json")
    assert trainer.read_summary(path) == {}
    trainer.write_summary(path, {"stages": {"sft": {"accuracy": 0.5}}})
    assert trainer.read_summary(path) == {"stages": {"sft": {"accuracy": 0.5}}}
    assert os.listdir(tmp_path / "out") == ["summary.json"]  # no temporary file left behind


def test_train_step_donates_the_state_only(tmp_path):
    config = base_config()
    cfg = preset("tiny")
    mesh = sharding.make_mesh({"data": -1})
    rules = [tuple(r) for r in config.sharding_rules]
    shapes = jax.eval_shape(lambda k: llama.init_params(cfg, k), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    tx = optax.sgd(0.1)
    state = state_lib.create(params, ptree.select(params, ".*"), tx, seed=0)
    shardings = sharding.param_shardings(jax.eval_shape(lambda: state), mesh, rules)
    state = jax.device_put(state, shardings)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    tok = D.ByteTokenizer()
    batch = next(D.PackedBatches([D.encode_sft(r, tok, 32) for r in D.instruction_records(40, 0)],
                                 32, 8, seed=0))
    batch = trainer.to_device(batch, batch_sharding)
    rng = jax.random.key(1)
    with sharding.use(mesh, rules):
        step = trainer.jit_train_step(sft.train_step, cfg, tx, 1, shardings, batch_sharding, mesh)
        new, _ = step(state, batch, rng)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.trainable))
    assert not any(x.is_deleted() for x in jax.tree.leaves(batch))
    assert not jax.random.key_data(rng).is_deleted()
    assert int(new.step) == 1

"""Runs fail loudly and never lose the good state (issue 11): the non-finite guard, strict JSON
metrics, preemption by SIGTERM, the resume guard, truncation with a policy, failed writes and the
best checkpoint.

References are written apart from the code: bitwise copies of the state taken before a step, a
strict JSON parser, brute-force longest runs, by-hand token layouts, and an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import event_files
from ptjax import checkpoint, sharding
from ptjax import data as D
from ptjax import tree as ptree
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.recipes import sft as sft_recipe
from ptjax.train import failures, guard, metrics, run_record, sft, steps, trainer
from ptjax.train import state as state_lib
from ptjax.train.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = D.ByteTokenizer()


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, as jq and most JSON readers do."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


# ---------------------------------------------------------------- the non-finite guard, unit


@pytest.fixture(scope="module")
def tiny_step():
    """A tiny model's SFT step jitted once (donating its state, as runs do), a batch, and a
    state whose trainable half is the LM head."""
    cfg = preset("tiny")
    config = base_config()
    mesh = sharding.make_mesh({"data": -1})
    rules = [tuple(r) for r in config.sharding_rules]
    params = jax.jit(llama.init_params, static_argnums=0)(cfg, jax.random.key(0))
    tx = optax.adam(1e-2)
    state = jax.device_get(state_lib.create(params, ptree.trainable_mask(params, "^lm_head"),
                                            tx, seed=0))  # on the host: each use copies it
    shardings = sharding.param_shardings(jax.eval_shape(lambda: state), mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    examples = [D.encode_sft(r, TOK, 32) for r in D.instruction_records(40, 0)]
    batch = trainer.to_device(next(D.PackedBatches(examples, 32, 8, seed=0)), batch_sharding)
    with sharding.use(mesh, rules):
        step = trainer.jit_train_step(sft.train_step, cfg, tx, 1, shardings, batch_sharding, mesh)
    fresh = lambda frozen_fill=None: jax.device_put(state.replace(  # noqa: E731
        frozen=state.frozen if frozen_fill is None else jax.tree.map(
            lambda x: jnp.full_like(x, frozen_fill), state.frozen)), shardings)
    return step, batch, fresh, (mesh, rules)


@pytest.mark.slow  # compiles the model's step (~9 s); CI keeps the cheaper skeleton test below
def test_nonfinite_step_leaves_params_and_optimizer_state_bitwise_unchanged(tiny_step):
    step, batch, fresh, (mesh, rules) = tiny_step
    bad = fresh(jnp.nan)  # a NaN in the frozen half: finite trainables, NaN loss and gradients
    before = jax.device_get((bad.trainable, bad.opt_state))
    with sharding.use(mesh, rules):
        new, m = step(bad, batch, jax.random.key(1))
    assert float(m["nonfinite"]) == 1.0 and not math.isfinite(float(m["loss"]))
    for want, got in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(
            (new.trainable, new.opt_state)))):
        assert want.tobytes() == np.asarray(got).tobytes()
    assert int(new.step) == 1  # the step counter advances: step numbering is unchanged

    good = fresh()
    before = jax.device_get(good.trainable)
    with sharding.use(mesh, rules):
        new, m = step(good, batch, jax.random.key(1))  # the same compiled step
    assert float(m["nonfinite"]) == 0.0
    assert not np.array_equal(jax.device_get(new.trainable["lm_head"]["kernel"]),
                              before["lm_head"]["kernel"])


def test_mean_loss_update_skips_nonfinite_steps():
    """The skeleton DPO, reward, PPO and GRPO steps share: a quadratic loss whose input row
    holds a NaN skips the update; a finite one applies plain SGD (checked in float64 numpy)."""
    tx = optax.sgd(0.5)
    params = {"w": jnp.asarray([1.0, -2.0])}
    state = state_lib.create(params, {"w": True}, tx, seed=0)
    loss_fn = lambda p, b, key: (jnp.mean((b["x"] @ p["w"]) ** 2), {})  # noqa: E731
    update = jax.jit(functools.partial(steps.mean_loss_update, loss_fn=loss_fn, tx=tx))
    x = np.asarray([[1.0, 2.0], [0.5, -1.0]])
    new, m = update(state, {"x": jnp.asarray(x, jnp.float32)}, jax.random.key(0))
    w = np.asarray([1.0, -2.0])
    grad = 2 * x.T @ (x @ w) / len(x)
    np.testing.assert_allclose(new.trainable["w"], w - 0.5 * grad, rtol=1e-6)
    assert float(m["nonfinite"]) == 0.0
    x[1, 0] = np.nan
    before = jax.device_get((new.trainable, new.opt_state))
    new2, m = update(new, {"x": jnp.asarray(x, jnp.float32)}, jax.random.key(0))
    assert float(m["nonfinite"]) == 1.0 and int(new2.step) == 2
    for want, got in zip(jax.tree.leaves(before),
                         jax.tree.leaves(jax.device_get((new2.trainable, new2.opt_state)))):
        assert np.asarray(want).tobytes() == np.asarray(got).tobytes()


def test_health_counts_the_longest_run_of_bad_steps():
    flags = [0, 1, 1, 0, 1, 1, 1, 0, 0, 1]
    health = guard.initial_health()
    for i, f in enumerate(flags):
        health = guard.track(health, jnp.float32(f))
        if i == 4:  # a log step in the middle: runs so far are 2 and 1
            health, total, too_many = guard.check(health, 3)
            assert (total, too_many) == (3, 0)
    # brute force: the longest run of 1s since the last check (it started before the check)
    health, total, too_many = guard.check(health, 3)
    assert (total, too_many) == (sum(flags), 3)
    assert guard.check(health, 3)[2] == 0  # the longest-run counter restarted


# ------------------------------------------------------------------- strict JSON metrics


def test_metrics_jsonl_is_strict_json_and_tensorboard_gets_only_finite_values(tmp_path):
    log = metrics.MetricsLog(str(tmp_path))
    log.write(1, {"train/loss": 2.0, "train/grad_norm": 0.5})
    log.write(2, {"train/loss": float("nan"), "train/grad_norm": np.float32("inf"),
                  "train/lr": 1e-3})
    log.close()
    rows = [strict_json(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[1] == {"step": 2, "train/loss": None, "train/grad_norm": None, "train/lr": 1e-3,
                       "nonfinite": ["train/loss", "train/grad_norm"]}
    assert "nonfinite" not in rows[0]
    scalars = event_files.scalars(str(tmp_path))
    assert all(math.isfinite(v) for _, _, v in scalars)
    assert ("train/lr", 2) in {(t, s) for t, s, _ in scalars}
    assert ("train/loss", 2) not in {(t, s) for t, s, _ in scalars}
    assert metrics.plot_losses(str(tmp_path)) is not None  # the plot skips the nulls


# ------------------------------------------------- checkpoints: finite only, failed writes


def _state_and_data(value=1.0):
    rng = np.random.default_rng(0)  # random bytes: compression cannot shrink them under a limit
    return {"w": jnp.asarray(rng.normal(size=(200, 200)) * value, jnp.float32)}, {"pos": 3}


def test_checkpoint_refuses_nonfinite_state(tmp_path):
    mngr = checkpoint.manager(str(tmp_path), async_save=False)
    good, data = _state_and_data()
    checkpoint.save(mngr, 1, good, data)
    bad = {"w": good["w"].at[3, 4].set(jnp.inf)}
    with pytest.raises(failures.NonFiniteError, match="step 2 holds non-finite.*last good "
                                                      "checkpoint is step 1"):
        checkpoint.save(mngr, 2, bad, data)
    assert mngr.all_steps() == [1]


@pytest.mark.parametrize("async_save", [False, True])
def test_failed_write_raises_and_keeps_the_previous_checkpoint(tmp_path, async_save):
    """An injected write error (RLIMIT_FSIZE: 'File too large', as a full disk would fail)."""
    mngr = checkpoint.manager(str(tmp_path), async_save=async_save)
    state, data = _state_and_data()
    checkpoint.save(mngr, 1, state, data)
    mngr.wait_until_finished()
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        with pytest.raises(failures.CheckpointWriteError,
                           match="could not write step 2 .*last good checkpoint is step 1"):
            checkpoint.save(mngr, 2, {"w": state["w"] * 2}, data)
            checkpoint.finish(mngr, 2)  # async: the failure surfaces here at the latest
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    again = checkpoint.manager(str(tmp_path), async_save=False)
    step, restored, data_back = checkpoint.restore_latest(
        again, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    assert step == 1 and data_back == data
    assert np.asarray(restored["w"]).tobytes() == np.asarray(state["w"]).tobytes()


# --------------------------------------------------------------------------- truncation


def test_truncation_keeps_completions_and_names_cut_and_dropped_lines(tmp_path, capsys):
    path = str(tmp_path / "train.jsonl")
    records = [{"prompt": "p" * 5, "completion": "ok"},       # 1 + 5 + 2 + 1 = 9 tokens: fits
               {"prompt": "q" * 40, "completion": "yes"},     # 45 tokens: cut
               {"prompt": "r" * 3, "completion": "a" * 30}]   # 35: cut into the answer's end
    D.write_jsonl(path, records)
    examples = sft_recipe.load_examples(path, TOK, 12, "left")
    out = capsys.readouterr().out
    assert f"{path}: 2 of 3 examples had their prompt cut from the left to fit 12 tokens " \
           "(data.truncate=left): train.jsonl:2, train.jsonl:3" in out
    ids, mask = examples[1]  # by hand: BOS, the last 7 prompt bytes, "yes", EOS
    assert ids.tolist() == [TOK.bos_id] + TOK.encode("q" * 7 + "yes") + [TOK.eos_id]
    assert mask.tolist() == [False] * 8 + [True] * 4
    ids, mask = examples[2]  # the whole prompt goes, then the answer's end: BOS + 11 "a"
    assert ids.tolist() == [TOK.bos_id] + TOK.encode("a" * 11) and mask[1:].all()
    assert all(m[1:].any() for _, m in examples)  # no example without a loss token

    kept = sft_recipe.load_examples(path, TOK, 12, "drop")
    assert len(kept) == 1
    assert "2 of 3 examples were dropped" in capsys.readouterr().out
    with pytest.raises(D.DataError, match="no example fits"):
        sft_recipe.load_examples(path, TOK, 4, "drop")


def test_preference_pairs_are_cut_or_dropped_whole_and_named(tmp_path, capsys):
    """Reward models and DPO read pairs the same way: both sides cut from the left (each keeps
    its response), the pair named by line; under `drop` a pair goes whole when a side is too
    long, so no side ever trains without the other."""
    from ptjax.recipes import reward as reward_recipe

    path = str(tmp_path / "pairs.jsonl")
    D.write_jsonl(path, [{"prompt": "p" * 3, "chosen": "ab", "rejected": "cd"},
                         {"prompt": "q" * 40, "chosen": "yes", "rejected": "no"}])
    pairs = reward_recipe.read_pair_file(path, TOK, 12, "left")
    assert f"{path}: 1 of 2 examples had their prompt cut from the left to fit 12 tokens " \
           "(data.truncate=left): pairs.jsonl:2" in capsys.readouterr().out
    (chosen, chosen_mask), (rejected, rejected_mask) = pairs[1]
    assert chosen.tolist() == [TOK.bos_id] + TOK.encode("q" * 7 + "yes") + [TOK.eos_id]
    assert rejected.tolist() == [TOK.bos_id] + TOK.encode("q" * 8 + "no") + [TOK.eos_id]
    assert chosen_mask[1:].any() and rejected_mask[1:].any()
    assert len(reward_recipe.read_pair_file(path, TOK, 12, "drop")) == 1
    assert "1 of 2 examples were dropped" in capsys.readouterr().out


# -------------------------------------------------------------------------- resume guard


def test_resume_guard_lists_each_change_and_honours_allow_changes():
    saved = {"optim.lr": 1e-3, "train.batch_size": 16, "data.train": {"path": "/a", "size": 1},
             "trainable": {"lm_head/kernel": [8, 4]}}
    current = dict(saved, **{"optim.lr": 1e-2, "data.train": {"path": "/a", "size": 2}})
    with pytest.raises(failures.ResumeMismatch) as e:
        run_record.check_resume(saved, current, "", "ck/40")
    message = str(e.value)
    assert "ck/40 belongs to a different run" in message
    assert "  optim.lr: 0.001 -> 0.01" in message and "  data.train: " in message
    assert "train.batch_size" not in message and "allow_changes=data.train,optim.lr" in message
    run_record.check_resume(saved, current, "optim,data.train", "ck/40")  # prefixes allowed
    with pytest.raises(failures.ResumeMismatch, match="optim.lr"):
        run_record.check_resume(saved, current, "data", "ck/40")
    reshaped = dict(saved, trainable={"lm_head/kernel": [8, 4], "lora/a": [4, 2]})
    with pytest.raises(failures.ResumeMismatch, match="trainable: new 1 .e.g. lora/a"):
        run_record.check_resume(saved, reshaped, "trainable", "ck/40")
    run_record.check_resume(None, current, "", "ck/40")  # a checkpoint without a record


def test_settings_of_a_method_that_is_off_never_block_a_resume():
    """A base written by the demo resumes under compare_compression, which sets
    `prune.calibration_rows` while pruning stays off; the same change with pruning on, or
    pruning turned on, is refused."""
    saved = {"prune.method": "", "prune.calibration_rows": 16, "peft.method": "full",
             "peft.rank": 8, "quant.method": "", "optim.lr": 1e-3}
    run_record.check_resume(saved, dict(saved, **{"prune.calibration_rows": 64,
                                                  "peft.rank": 16}), "", "ck/40")
    on = dict(saved, **{"prune.method": "wanda"})
    with pytest.raises(failures.ResumeMismatch, match="prune.calibration_rows: 16 -> 64"):
        run_record.check_resume(on, dict(on, **{"prune.calibration_rows": 64}), "", "ck/40")
    with pytest.raises(failures.ResumeMismatch, match="prune.method: '' -> 'wanda'"):
        run_record.check_resume(saved, on, "", "ck/40")


def test_row_streams_are_recorded_only_when_they_change_the_batches():
    """`data.streams` decides which examples share a batch: a changed count is refused, while
    one stream leaves the record as it was before streams existed (older checkpoints resume)."""
    from ptjax.models.config import preset
    from ptjax.train.config import base_config

    c = base_config()
    describe = functools.partial(run_record.describe, model_cfg=preset("tiny"), trainable={},
                                 tokenizer=TOK)
    one = describe(c)
    assert "data.streams" not in one
    c.data.streams = 4
    four = describe(c)
    assert four["data.streams"] == 4
    with pytest.raises(failures.ResumeMismatch, match="data.streams: None -> 4"):
        run_record.check_resume(one, four, "", "ck/40")


def test_run_record_is_read_back_and_older_checkpoints_have_none(tmp_path):
    mngr = checkpoint.manager(str(tmp_path), async_save=False)
    state, data = _state_and_data()
    checkpoint.save(mngr, 1, state, data)  # as checkpoints were written before the record
    checkpoint.save(mngr, 2, state, data, run={"optim.lr": 0.1, "trainable": {"w": [200, 200]}})
    again = checkpoint.manager(str(tmp_path), async_save=False)
    assert checkpoint.read_run(again, 1) is None
    assert checkpoint.read_run(again, 2) == {"optim.lr": 0.1, "trainable": {"w": [200, 200]}}


def test_file_fingerprint_sees_a_changed_data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    first = run_record.file_fingerprint(str(path))
    path.write_text('{"prompt": "a", "completion": "c"}\n')
    assert run_record.file_fingerprint(str(path)) != first
    assert first["size"] == os.path.getsize(path)


# ------------------------------------------------------------ a run that goes wrong, whole


def _config(steps=12, **train):  # batch 8: tests see 8 CPU devices
    config = base_config()
    config.model.preset = "tiny"
    config.train.update(**{"steps": steps, "batch_size": 8, "seq_len": 32, "log_every": 2,
                           "max_bad_steps": 3, **train})
    config.eval.every = 0
    config.checkpoint.update(every=4, keep=5, async_save=True)
    config.optim.update(warmup_steps=0)
    return config


EXAMPLES = [D.encode_sft(r, TOK, 32) for r in D.instruction_records(40, 0)]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):  # ~9 s on 2 cores: the one whole run in CI
    """The issue's run in small: lr 1e4 without clipping. It must stop, naming the step and the
    last good checkpoint."""
    workdir = str(tmp_path_factory.mktemp("diverged"))
    config = _config()
    config.optim.update(lr=1e4, clip_norm=0.0)
    with pytest.raises(failures.NonFiniteError) as e:  # noqa: PT012
        trainer.train(config, workdir, EXAMPLES, show_progress=False)
    return workdir, config, str(e.value)


def test_diverging_run_stops_with_finite_checkpoints_and_strict_metrics(diverged):
    workdir, config, message = diverged
    rows = [strict_json(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    stop = rows[-1]["step"]
    assert f"stops at step {stop}" in message and "train.max_bad_steps=3" in message
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert saved and f"the last good checkpoint is step {saved[-1]} in" in message
    assert any(r.get("nonfinite") for r in rows) and rows[-1]["train/skipped_steps"] >= 3
    mngr = checkpoint.manager(workdir, async_save=False)
    for step in saved:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["state"])
                   if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_rerun_with_changes_is_refused_naming_them(diverged):
    workdir, config, _ = diverged
    changed = _config(batch_size=16)
    changed.optim.update(lr=1e-3)
    with pytest.raises(failures.ResumeMismatch) as e:
        trainer.train(changed, workdir, EXAMPLES, show_progress=False)
    assert "  optim.lr: 10000.0 -> 0.001" in str(e.value)
    assert "  train.batch_size: 8 -> 16" in str(e.value)
    assert "optim.clip_norm" in str(e.value)
    lora = _config()
    lora.optim.update(lr=1e4, clip_norm=0.0)
    lora.peft.method = "lora"
    with pytest.raises(failures.ResumeMismatch, match="other trainable parameters"):
        trainer.train(lora, workdir, EXAMPLES, show_progress=False)
    clipped = _config()
    clipped.optim.update(lr=1e4, clip_norm=1.0)  # adds a clipping state: cannot be restored
    clipped.checkpoint.allow_changes = "optim"
    with pytest.raises(failures.ResumeMismatch, match="optimizer_state: no longer present"):
        trainer.train(clipped, workdir, EXAMPLES, show_progress=False)


@pytest.mark.slow
def test_allowed_change_resumes_and_keeps_the_best_checkpoint(tmp_path):
    workdir = str(tmp_path)
    trainer.train(_config(steps=4), workdir, EXAMPLES, show_progress=False)
    longer = _config(steps=10)
    longer.optim.update(lr=2e-3)
    with pytest.raises(failures.ResumeMismatch, match="allow_changes=optim.lr,train.steps"):
        trainer.train(longer, workdir, EXAMPLES, show_progress=False)
    longer.eval.update(every=2, max_batches=2)
    longer.checkpoint.update(allow_changes="optim.lr,train.steps", keep_best=True)
    held_out = [D.encode_sft(r, TOK, 32) for r in D.instruction_records(20, 1)]
    trainer.train(longer, workdir, EXAMPLES, held_out, show_progress=False)
    rows = [strict_json(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8, 10]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert sorted(evals) == [6, 8, 10]  # evaluated after the resume at step 4
    best = [int(s) for s in os.listdir(os.path.join(workdir, "best")) if s.isdigit()]
    assert best == [min(evals, key=evals.get)]


# --------------------------------------------------------------------------- preemption


@pytest.mark.slow  # three whole runs (~30 s on 2 cores)
def test_sigterm_saves_the_current_step_and_the_rerun_matches(tmp_path, monkeypatch):
    """In-process: SIGTERM arrives after step 6 (checkpoints every 4): the run saves step 6 and
    raises Preempted; the rerun resumes there and logs what an uninterrupted run logs."""
    config = _config(steps=8)
    config.train.log_every = 1
    reference = str(tmp_path / "reference")
    trainer.train(config, reference, EXAMPLES, show_progress=False)

    workdir = str(tmp_path / "run")
    original = metrics.MetricsLog.write

    def write(self, step, row):
        original(self, step, row)
        if step == 6 and "train/loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
    monkeypatch.setattr(metrics.MetricsLog, "write", write)
    with pytest.raises(failures.Preempted) as e:
        trainer.train(config, workdir, EXAMPLES, show_progress=False)
    assert e.value.step == 6
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [4, 6]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    monkeypatch.setattr(metrics.MetricsLog, "write", original)
    trainer.train(config, workdir, EXAMPLES, show_progress=False)

    def losses(w):
        return [(r["step"], r["train/loss"], r["train/grad_norm"])
                for r in metrics.read(w) if "train/loss" in r]
    assert losses(workdir) == losses(reference)


def _losses(workdir) -> np.ndarray:
    """[step, loss] of every logged train step."""
    return np.array([[r["step"], r["train/loss"]] for r in metrics.read(workdir)
                     if "train/loss" in r])


def _env():
    return dict(os.environ, PTJAX_NO_REEXEC="1", XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _launch(workdir, train_path, *extra, steps=40):
    return [sys.executable, os.path.join(REPO, "launch.py"),
            "--config=" + os.path.join(REPO, "configs/sft.py"), f"--workdir={workdir}",
            "--config.model.preset=tiny", f"--config.data.train={train_path}",
            f"--config.train.steps={steps}", "--config.train.batch_size=4",
            "--config.train.seq_len=64", "--config.train.log_every=1",
            "--config.checkpoint.every=10", "--config.eval.every=0", *extra]


@pytest.mark.slow
def test_launch_exit_codes_sigterm_zero_and_nan_nonzero(tmp_path):
    """Through launch.py, as a scheduler sees it: SIGTERM mid-run exits 0 with a checkpoint
    at the current step and the rerun equals an uninterrupted run; the issue's NaN run exits
    non-zero naming the step and the last good checkpoint."""
    data = str(tmp_path / "train.jsonl")
    D.write_jsonl(data, D.instruction_records(200, seed=0))
    reference = str(tmp_path / "reference")
    subprocess.run(_launch(reference, data), check=True, env=_env(), capture_output=True)

    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_launch(workdir, data), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not os.path.isdir(
            os.path.join(workdir, "checkpoints", "10")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert "launch.py: preempted: saved step" in err
    saved = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert 10 <= saved < 40
    subprocess.run(_launch(workdir, data), check=True, env=_env(), capture_output=True)
    np.testing.assert_allclose(_losses(workdir), _losses(reference), rtol=1e-6)

    nan = subprocess.run(_launch(str(tmp_path / "nan"), data, "--config.optim.lr=1e4",
                                 "--config.optim.clip_norm=0"),
                         env=_env(), capture_output=True, text=True)
    assert nan.returncode == 1, nan.stderr[-2000:]
    assert "non-finite loss or gradient norm" in nan.stderr
    assert "the last good checkpoint is step" in nan.stderr or "no checkpoint" in nan.stderr
    for line in open(os.path.join(tmp_path, "nan", "metrics.jsonl")):
        strict_json(line)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_preempted_save_the_same_step_and_resume_like_one(tmp_path):
    """SIGTERM to one process of two: the runtime's preemption notice reaches both, they agree
    on a step, both save it and exit 0; the rerun ends like one uninterrupted process."""
    data = str(tmp_path / "train.jsonl")
    D.write_jsonl(data, D.instruction_records(200, 0))
    steps, every = "--config.train.steps=30", "--config.checkpoint.every=5"
    extra = (steps, every, "--config.train.batch_size=8", "--config.train.seq_len=32",
             "--config.mesh.data=1", "--config.mesh.fsdp=-1")
    def devices(n):
        return dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    single = str(tmp_path / "single")
    subprocess.run(_launch(single, data, *extra), check=True, env=devices(4), capture_output=True)

    def pair(workdir, tag):
        port = _free_port()
        return [subprocess.Popen(_launch(workdir, data, *extra, f"--coordinator=127.0.0.1:{port}",
                                         "--num_processes=2", f"--process_id={pid}"),
                                 env=devices(2), stdout=open(tmp_path / f"{tag}{pid}.log", "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
                for pid in (1, 0)]

    multi = str(tmp_path / "multi")
    procs = pair(multi, "preempted_")
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(multi, "checkpoints", "5")):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            open(tmp_path / "preempted_0.log").read()[-3000:]
        time.sleep(0.02)
    procs[0].send_signal(signal.SIGTERM)  # process 1 only: the notice must reach process 0
    codes = [p.wait(timeout=240) for p in procs]
    log0 = open(tmp_path / "preempted_0.log").read()
    assert codes == [0, 0], log0[-3000:]
    saved = int(log0.split("preempted: saved step ")[1].split()[0])
    assert 5 < saved < 30 and str(saved) in os.listdir(os.path.join(multi, "checkpoints"))
    assert f"preempted: saved step {saved}" in open(tmp_path / "preempted_1.log").read()

    procs = pair(multi, "resumed_")
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)

"""A run killed with SIGKILL (mid-training or mid-save) and rerun ends exactly like an
uninterrupted one: params, optimizer state, step, RNG and data position all come back."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from ptjax import data as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KILL_DURING_SAVE = """
import os, runpy, signal, sys
import ptjax.checkpoint as ck
original = ck.save
def save(mngr, step, *args, **kwargs):
    result = original(mngr, step, *args, **kwargs)  # async: the write is still in flight
    if step == int(os.environ["KILL_AT_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
ck.save = save
sys.argv = [sys.argv[0]] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["REPO"], "launch.py"), run_name="__main__")
"""


def command(workdir, train_path, steps=30):
    return ["--config=" + os.path.join(REPO, "configs/sft.py"), f"--workdir={workdir}",
            "--config.model.preset=tiny", f"--config.data.train={train_path}",
            f"--config.train.steps={steps}", "--config.train.batch_size=4",
            "--config.train.seq_len=64", "--config.train.log_every=1",
            "--config.checkpoint.every=4", "--config.eval.every=0"]


CACHE = tempfile.mkdtemp(prefix="ptjax-test-jax-cache-")


def env():
    # The runs compile the same step: a shared persistent compilation cache saves the repeats.
    return dict(os.environ, PTJAX_NO_REEXEC="1", XLA_FLAGS="", REPO=REPO, JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps: {steps}"
    return {r["step"]: (r["train/loss"], r["train/grad_norm"]) for r in rows}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    D.write_jsonl(str(path), D.instruction_records(300, seed=0))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_file):
    workdir = str(tmp_path_factory.mktemp("reference"))
    subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *command(workdir, train_file)],
                   check=True, env=env(), capture_output=True)
    return workdir


def test_run_writes_config_metrics_tensorboard_and_plot(reference):
    config = json.load(open(os.path.join(reference, "config.json")))
    assert config["train"]["steps"] == 30 and config["model"]["preset"] == "tiny"
    rows = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"train/loss", "train/lr", "train/grad_norm"} <= set(r) for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(reference, "tensorboard")))
    assert open(os.path.join(reference, "loss.png"), "rb").read(4) == b"\x89PNG"


def test_unknown_config_key_is_named(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"),
                           "--config=" + os.path.join(REPO, "configs/sft.py"),
                           f"--workdir={tmp_path}", "--config.train.stepz=3"],
                          env=env(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unknown config key 'stepz' in --config.train.stepz" in proc.stderr
    assert "did you mean 'steps'" in proc.stderr


def test_malformed_data_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"),
                           *command(str(tmp_path / "run"), str(bad))],
                          env=env(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{bad}:2: field 'completion'" in proc.stderr




def test_sigkill_during_save_then_mid_training_then_rerun_matches(tmp_path, train_file, reference):
    """Kill 1: SIGKILL right after the step-8 save starts (async write in flight). Kill 2: the
    resumed run is SIGKILLed mid-training. The third run finishes; its metrics equal the
    uninterrupted reference's."""
    workdir = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *command(workdir, train_file)],
                          env=dict(env(), KILL_AT_SAVE="8"), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))  # the last good one is intact

    args = [sys.executable, os.path.join(REPO, "launch.py"), *command(workdir, train_file)]
    run = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    later = os.path.join(workdir, "checkpoints", "12")
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None and not os.path.isdir(later):
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "30"))

    subprocess.run(args, check=True, env=env(), capture_output=True)
    assert losses(workdir) == pytest.approx(losses(reference), rel=1e-6)
    assert max(int(c) for c in os.listdir(os.path.join(workdir, "checkpoints")) if c.isdigit()) == 30

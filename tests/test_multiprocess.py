"""Two real processes on one global mesh train exactly as one process does, and resume together.

`launch.py --coordinator/--num_processes/--process_id` starts JAX's multi-controller runtime
(gloo collectives over 127.0.0.1); each process has 2 CPU devices, and the run shards the
parameters and optimizer state over all 4 (FSDP), so checkpoints and the exported model need
shards that live in the other process. The reference is one process with 4 devices and the
same global batch. The batch comes in two row streams (`data.streams=2`), so each process of the
pair tokenizes and packs only the half of the data its devices hold.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from ptjax import data as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
EVERY = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(data: str, workdir: str, *extra: str) -> list[str]:
    evals = os.path.join(os.path.dirname(data), "eval.jsonl")
    return [sys.executable, "launch.py", "--config=configs/sft.py", f"--workdir={workdir}",
            "--config.model.preset=tiny", f"--config.data.train={data}",
            f"--config.data.eval={evals}", f"--config.eval.every={STEPS // 2}",
            f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
            "--config.train.seq_len=32", "--config.train.log_every=1",
            f"--config.checkpoint.every={EVERY}", f"--config.checkpoint.keep={STEPS}",
            "--config.mesh.data=1", "--config.mesh.fsdp=-1",
            # two row streams: each process of the pair tokenizes and packs only its own
            "--config.data.streams=2", *extra]


def _env(devices: int) -> dict:
    # the backend optimization level of tests/conftest.py (compiling is most of these runs)
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
            "--xla_backend_optimization_level=0", "PTJAX_NO_REEXEC": "1", "JAX_PLATFORMS": "cpu"}


def _start_pair(data: str, workdir: str, log_prefix: str) -> list[subprocess.Popen]:
    """Process 1 and process 0 of a two-process run, each writing its own log."""
    port = _free_port()
    procs = []
    for pid in (1, 0):
        log = open(f"{log_prefix}{pid}.log", "w")
        procs.append(subprocess.Popen(
            _command(data, workdir, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={pid}"),
            cwd=ROOT, env=_env(2), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(procs, timeout: float = 240):
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise
    return [p.returncode for p in procs]


def _steps_saved(workdir: str) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n) for n in names if n.isdigit())


def _train_rows(workdir: str) -> np.ndarray:
    """[step, loss, loss tokens in the global batch] of every logged step."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return np.array([[r["step"], r["train/loss"], r["train/tokens"]]
                     for r in rows if "train/loss" in r])


def _eval_rows(workdir: str) -> np.ndarray:
    """[step, eval loss] of every evaluation."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return np.array([[r["step"], r["eval/loss"]] for r in rows if "eval/loss" in r])


def test_two_processes_train_like_one_and_resume_after_a_kill(tmp_path):
    data = str(tmp_path / "train.jsonl")
    D.write_jsonl(data, D.instruction_records(200, 0))
    # 37 eval records: the two streams pack different numbers of rows, so the shorter one's
    # process pads its eval batches to the other's count
    D.write_jsonl(str(tmp_path / "eval.jsonl"), D.instruction_records(37, 1))

    single = str(tmp_path / "single")
    reference = subprocess.run(_command(data, single), cwd=ROOT, env=_env(4),
                               capture_output=True, text=True, timeout=240)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]

    # Two processes, SIGKILLed together once a few checkpoints exist, mid-run.
    multi = str(tmp_path / "multi")
    procs = _start_pair(data, multi, str(tmp_path / "killed_"))
    deadline = time.time() + 240
    while not any(s >= 2 * EVERY for s in _steps_saved(multi)):
        assert time.time() < deadline, "no checkpoint from the two-process run"
        assert all(p.poll() is None for p in procs), open(tmp_path / "killed_0.log").read()[-3000:]
        time.sleep(0.02)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
    _wait(procs)
    saved = _steps_saved(multi)
    assert saved and max(saved) < STEPS, f"the kill came too late to interrupt the run: {saved}"

    # The same command again: both processes restore the checkpoint both wrote and finish.
    procs = _start_pair(data, multi, str(tmp_path / "resumed_"))
    assert _wait(procs) == [0, 0], open(tmp_path / "resumed_0.log").read()[-3000:]
    log0 = open(tmp_path / "resumed_0.log").read()
    assert "multi: resuming at step" in log0
    resumed_at = int(log0.split("multi: resuming at step ")[1].split()[0])
    assert 2 * EVERY <= resumed_at < STEPS
    for pid in (0, 1):  # each process tokenized only its stream's half of the 200 records
        log = open(tmp_path / f"resumed_{pid}.log").read()
        assert f"process {pid}: tokenized 100 of 200 training examples" in log, log[-2000:]

    want, got = _train_rows(single), _train_rows(multi)
    # one row per step: process 1 writes no metrics of its own, and the resume dropped the
    # rows the killed run had logged after its last checkpoint
    np.testing.assert_array_equal(got[:, 0], np.arange(1, STEPS + 1))
    # the same global batch (a duplicated one would give the same mean loss, twice the tokens)
    np.testing.assert_array_equal(got[:, 2], want[:, 2])
    np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=1e-5)
    want_eval, got_eval = _eval_rows(single), _eval_rows(multi)
    np.testing.assert_array_equal(got_eval[:, 0], [STEPS // 2, STEPS])
    np.testing.assert_allclose(got_eval, want_eval, rtol=1e-5)

    # The export gathered the FSDP shards of both processes: the same weights as one process.
    a = load_file(os.path.join(single, "merged", "model.safetensors"))
    b = load_file(os.path.join(multi, "merged", "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_to_device_lays_out_the_global_batch():
    """A global host batch becomes a global array equal to it, its rows split over the mesh."""
    import jax

    from ptjax import sharding
    from ptjax.train import trainer

    mesh = sharding.make_mesh({"data": -1})
    batch = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    out = trainer.to_device(batch, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, ndim=1))
    assert out["inputs"].shape == (8, 3)
    assert len(out["inputs"].sharding.device_set) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(out["inputs"]), batch["inputs"])


PPO_STEPS = 3


def _ppo_command(policy: str, prompts: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "launch.py", "--config=configs/ppo.py", f"--workdir={workdir}",
            f"--config.model.init={policy}",
            f"--config.ppo.prompts={prompts}",
            "--config.ppo.reward_fn=ptjax.data.synthetic:graded_reward",
            f"--config.train.steps={PPO_STEPS}", "--config.train.batch_size=8",
            "--config.ppo.max_new_tokens=6", "--config.ppo.epochs=1",
            "--config.ppo.minibatches=2", f"--config.checkpoint.every={PPO_STEPS}",
            "--config.mesh.data=1", "--config.mesh.fsdp=-1", *extra]


def _ppo_rows(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "ppo/score" in r]
    return {k: np.array([r[k] for r in rows]) for k in
            ("step", "ppo/score", "ppo/kl", "ppo/approx_kl", "ppo/value_loss", "ppo/entropy",
             "ppo/response_length")}


@pytest.mark.slow
def test_two_processes_run_ppo_like_one(tmp_path):
    """PPO's rollouts, scores, statistics and updates across two processes (FSDP over both,
    results gathered from the other host where the loop reads them) equal one process's."""
    import jax

    from ptjax.interop import export
    from ptjax.models import llama
    from ptjax.models.config import preset

    policy = str(tmp_path / "policy")
    cfg = preset("tiny")
    export.save_hf(jax.device_get(llama.init_params(cfg, jax.random.key(0))), cfg,
                   D.load_tokenizer("byte"), policy)
    prompts = str(tmp_path / "prompts.jsonl")
    D.write_jsonl(prompts, [{"prompt": r["prompt"]} for r in D.instruction_records(64, 1)])
    single = str(tmp_path / "single")
    reference = subprocess.run(_ppo_command(policy, prompts, single), cwd=ROOT, env=_env(4),
                               capture_output=True, text=True, timeout=240)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = []
    for pid in (1, 0):
        log = open(tmp_path / f"ppo_{pid}.log", "w")
        procs.append(subprocess.Popen(
            _ppo_command(policy, prompts, multi, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={pid}"),
            cwd=ROOT, env=_env(2), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    assert _wait(procs) == [0, 0], open(tmp_path / "ppo_0.log").read()[-3000:]
    want, got = _ppo_rows(single), _ppo_rows(multi)
    np.testing.assert_array_equal(got["step"], np.arange(1, PPO_STEPS + 1))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)

"""The training loop: build state on the mesh, resume, step, log, evaluate, checkpoint.

Reads top to bottom. Everything a step needs is in `TrainState`; everything a resume needs is in
the checkpoint (state + iterator position), so rerunning the same command continues the run and
produces the same metrics an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from ptjax import checkpoint, peft, prune, quant, sharding
from ptjax import data as D
from ptjax import tree as ptree
from ptjax.data import PackedBatches, eval_batches
from ptjax.models import llama
from ptjax.models.config import ModelConfig, preset
from ptjax.train import failures, guard, optim, preemption, run_record, sft
from ptjax.train import metrics as metrics_lib
from ptjax.train import state as state_lib


def model_config(config, checkpoint_cfg: ModelConfig | None = None) -> ModelConfig:
    """The model a run config asks for, with its `model.dtype`, `model.remat` and
    `model.scan_layers`.

    With a checkpoint (`model.init`), its own config is the model and a `model.preset`, if the
    config names one, must agree with it; without one, `model.preset` (default "demo") picks it.
    """
    overrides = {"dtype": config.model.dtype, "remat": config.model.remat,
                 "scan_layers": config.model.scan_layers}
    if checkpoint_cfg is None:
        return preset(config.model.preset or "demo", **overrides)
    if config.model.preset:
        from ptjax.interop import load

        load.check_preset(checkpoint_cfg, preset(config.model.preset), config.model.init)
    return dataclasses.replace(checkpoint_cfg, **overrides)


def write_config(config, workdir: str):
    """Record the exact resolved config of a run as WORKDIR/config.json (process 0 writes it:
    in a multi-process run every process has the same config, and one writer keeps the file
    whole)."""
    with failures.writing("workdir", workdir):
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() != 0:
            return
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def to_device(batch: dict, sharding_: jax.sharding.Sharding) -> dict:
    """The global host batch -> global arrays laid out by `sharding_`, each process putting on
    its devices only the rows they hold.

    Why the global batch on every host: the batch iterators are deterministic functions of
    `(seed, step)`, so every process computes the same global batch for any process count, and
    the run gives the same losses on one process or many. Each process then copies only its
    devices' shards (`make_array_from_callback` asks for exactly their index ranges); handing
    the whole batch to `make_array_from_process_local_data` instead made it that process's part,
    so N processes trained on N times the batch, made of duplicates.
    """
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    return {k: jax.make_array_from_callback(v.shape, sharding_, lambda index, v=v: v[index])
            for k, v in arrays.items()}


def jit_train_step(train_step, cfg: ModelConfig, tx, grad_accum: int, state_shardings,
                   batch_sharding, mesh):
    """An objective's train step jitted once for a run: explicit in/out shardings, and the
    incoming state donated, so XLA writes the new params and optimizer state over the old ones
    (one copy in memory, not two)."""
    return jax.jit(functools.partial(train_step, model_cfg=cfg, tx=tx, grad_accum=grad_accum),
                   in_shardings=(state_shardings, batch_sharding, sharding.replicated(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def saved_part(state, keep_masks: bool):
    """What a checkpoint holds of `state` (a TrainState of arrays or of shardings).

    Frozen weights are not checkpointed: they come from the base every time, so an adapter run's
    checkpoints hold only adapters and optimizer state. The exception is the pruning masks of a
    gradual schedule (`keep_masks`), which change during training and cannot be derived again.
    """
    if not keep_masks:
        return state.replace(frozen=None)
    return state.replace(frozen=ptree.map_with_path(
        lambda p, v: v if p.endswith("/mask") else None, state.frozen))


def update_masks(state, prune_cfg, step: int, trainable_mask, state_shardings):
    """Gradual pruning after `step` steps: masks recomputed on the host from the current weights
    (`prune.update_masks`), pruned entries zeroed, and both halves put back with their
    shardings. Runs only every `prune.every` steps, so the host round trip is rare."""
    params = prune.update_masks(ptree.to_host(state.params), prune_cfg, step)
    trainable, frozen = ptree.split(params, trainable_mask)
    return state.replace(trainable=jax.device_put(trainable, state_shardings.trainable),
                         frozen=jax.device_put(frozen, state_shardings.frozen))


class Best:
    """`checkpoint.keep_best`: besides the newest checkpoints, WORKDIR/best holds the one with
    the lowest eval loss so far (written only when an evaluation beats it)."""

    def __init__(self, workdir: str, config):
        self.mngr = checkpoint.manager(workdir, keep=1, subdir="best", best_metric="eval/loss",
                                       async_save=config.checkpoint.async_save)
        step = self.mngr.best_step()
        self.loss = (self.mngr.metrics(step) or {}).get("eval/loss", math.inf) if step else math.inf

    def offer(self, step: int, row: dict, state, data_state: dict, record: dict):
        """Save `state` as the best checkpoint when `row`'s eval loss is finite and lower."""
        loss = float(row["eval/loss"])
        if math.isfinite(loss) and loss < self.loss and self.mngr.latest_step() != step:
            checkpoint.save(self.mngr, step, state, data_state, run=record,
                            metrics={"eval/loss": loss})
            self.loss = loss


@contextlib.contextmanager
def _finish_on_error(mngr, best, log):
    """When the loop raises, let saves already in flight land (the last good checkpoint is then
    whole on disk) and close the metrics file, then re-raise."""
    try:
        yield
    except BaseException:
        for m in (mngr, best.mngr if best is not None else None):
            if m is not None:
                try:
                    m.wait_until_finished()
                    m.close()
                except Exception:  # noqa: BLE001 (the original error is the one to report)
                    pass
        log.close()
        raise


@dataclasses.dataclass
class Result:
    """What a finished (or already complete) run hands back to its caller."""

    params: dict
    model_cfg: ModelConfig
    metrics: dict
    trainable_params: int = 0
    optimizer_state_bytes: int = 0


@dataclasses.dataclass
class Objective:
    """What a run optimizes and how it is measured; `train` runs any of them the same way.

    Why one record: SFT, reward modeling and DPO differ only in their data, their jitted steps
    and what their evaluation reports; state creation on the mesh, quantization and PEFT,
    checkpoints, resumption, logging and the progress bar are the trainer's, once.
    `train_step(state, batch, rng, *, model_cfg, tx, grad_accum) -> (state, metrics)`;
    `eval_step(params, batch, *, model_cfg) -> dict of sums` over a batch; `summarize(sums)` ->
    `{"eval/...": value}`. `batches` is an endless host-batch iterator with `state()` and
    `restore()`; `add_params(params, model_cfg, key)`, if set, adds parameters (a score head)
    before quantization and PEFT, and `trainable` is a regex of paths that train besides the
    PEFT method's.
    """

    train_step: Callable
    eval_step: Callable
    summarize: Callable
    batches: Any
    eval_batches: list
    tokens_per_batch: int
    add_params: Callable | None = None
    trainable: str = ""


def summarize_lm(sums) -> dict:
    """Token-weighted loss, perplexity and next-token accuracy from `sft.eval_step` sums."""
    tokens = max(float(sums["tokens"]), 1.0)
    loss = float(sums["nll_sum"]) / tokens
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/accuracy": float(sums["correct"]) / tokens}


def sft_objective(config, train_examples, eval_examples=(), local_streams=None) -> Objective:
    """Next-token loss on encoded `(ids, loss_mask)` examples, packed into rows (SFT and
    pretraining), with the PEFT method's virtual-token slots inserted.

    Rows come in `data.streams` row streams; this process builds only `local_streams` (default
    all: `local_streams_of`), so with `D.LazyExamples` it encodes only their examples."""
    tc = config.train
    streams = config.data.streams

    def with_slots(examples):
        if isinstance(examples, D.LazyExamples):
            return examples.map(lambda e: peft.add_virtual_slots(e, config.peft))
        return [peft.add_virtual_slots(e, config.peft) for e in examples]

    evals = eval_batches(with_slots(eval_examples), tc.seq_len, tc.batch_size, streams,
                         local_streams)
    return Objective(
        train_step=sft.train_step, eval_step=sft.eval_step, summarize=summarize_lm,
        batches=PackedBatches(with_slots(train_examples), tc.seq_len, tc.batch_size,
                              seed=config.seed, streams=streams, local_streams=local_streams),
        eval_batches=pad_to_global_count(evals)[:config.eval.max_batches],
        tokens_per_batch=tc.batch_size * tc.seq_len)


def local_streams_of(batch_sharding, batch_size: int, streams: int) -> list[int]:
    """The row streams (`data.streams`) with a row on this process's devices: the only ones
    this process needs to build (all of them in a one-process run)."""
    per, _ = D.stream_layout(batch_size, streams)
    rows = set()
    for index in batch_sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return sorted({r // per for r in rows})


def pad_to_global_count(batches: list) -> list:
    """`batches` followed by all-zero batches up to the longest list any process has.

    Every process must run the same number of eval steps (each is one collective program), but
    with row streams a process knows only its own streams' lengths; zero rows have loss mask 0,
    so the padding adds nothing to the sums."""
    if jax.process_count() == 1:
        return batches
    from jax.experimental import multihost_utils

    count = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
    if len(batches) == count:
        return batches
    if not batches:
        raise ValueError("this process has no eval rows while others do; use fewer data.streams")
    zeros = {k: np.zeros_like(v) for k, v in batches[0].items()}
    return batches + [dict(zeros) for _ in range(count - len(batches))]


def evaluate(eval_fn, params, batches, batch_sharding, summarize=summarize_lm) -> dict:
    """The objective's metrics over all eval batches (per-batch sums added, then summarized)."""
    sums: dict = {}
    for b in batches:
        out = jax.device_get(eval_fn(params, to_device(b, batch_sharding)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return summarize(sums)


def initial_state(config, cfg: ModelConfig, mesh, rules, init_params=None, tokenizer=None,
                  add_params=None, extra_trainable: str = "", calibration=None):
    """(state, its shardings, trainable mask, optimizer) of a fresh run, laid out on the mesh.

    The one place a run's parameters are built: `init_params` (random when None), then
    `add_params` (a new head), pruning (`calibration` rows for Wanda/SparseGPT), quantization
    and the PEFT method; `extra_trainable` paths train besides the method's. The state is
    created directly with its shardings.
    """
    if init_params is None:
        init_params = jax.jit(llama.init_params, static_argnums=0)(cfg, jax.random.key(config.seed))
    if add_params is not None:
        init_params = add_params(init_params, cfg, jax.random.fold_in(jax.random.key(config.seed), 3))
    quant.check(config.quant, config.peft.method)
    init_params = prune.apply(init_params, config.prune, cfg, calibration)
    init_params = quant.apply(init_params, config.quant)
    init_params, trainable = peft.apply(init_params, cfg, config.peft,
                                        jax.random.fold_in(jax.random.key(config.seed), 1),
                                        tokenizer or D.load_tokenizer(config.data.tokenizer))
    if extra_trainable:
        trainable = f"(?:{trainable})|(?:{extra_trainable})"
    trainable_mask = ptree.trainable_mask(init_params, trainable)
    tx = optim.make_optimizer(config.optim, ptree.split(init_params, trainable_mask)[0],
                              config.train.steps)
    create = functools.partial(state_lib.create, trainable_mask=trainable_mask, tx=tx,
                               seed=config.seed, frozen_matmul_dtype=cfg.compute_dtype)
    state_shardings = sharding.param_shardings(jax.eval_shape(create, init_params), mesh, rules)
    state = jax.jit(create, out_shardings=state_shardings)(init_params)
    return state, state_shardings, trainable_mask, tx


def train(config, workdir: str, train_examples=None, eval_examples=(), init_params=None,
          show_progress: bool = True, model_cfg: ModelConfig | None = None,
          tokenizer=None, objective: Objective | None = None) -> Result:
    """Train (or resume training) and return the final parameters.

    `train_examples`/`eval_examples` are lists of `(ids, loss_mask)` from `ptjax.data.encode_sft`
    for next-token training; another `objective` (reward modeling, DPO) brings its own data.
    Calibrated pruning (Wanda, SparseGPT) draws its calibration rows from `train_examples`.
    `init_params` starts from given weights (e.g. a pretrained base) instead of random ones, and
    `model_cfg` is then their config (default: `model_config(config)`); `tokenizer` (default:
    `data.tokenizer`) initializes text-initialized soft prompts and is fingerprinted in the
    checkpoints' run record.

    When things go wrong it raises (`ptjax.train.failures`): `NonFiniteError` after
    `train.max_bad_steps` consecutive skipped non-finite steps, `CheckpointWriteError` when a
    checkpoint cannot be written, `ResumeMismatch` when the workdir's checkpoint belongs to
    another run, and `Preempted` after saving the current step on SIGTERM.
    """
    write_config(config, workdir)
    cfg = model_cfg or model_config(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = [tuple(r) for r in config.sharding_rules]
    tc = config.train
    if tc.batch_size % tc.grad_accum:
        raise ValueError(f"train.batch_size ({tc.batch_size}) must be divisible by "
                         f"train.grad_accum ({tc.grad_accum})")
    sharding.check_rows_split(mesh, tc.batch_size, "train.batch_size")

    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=1)  # rows split, the rest whole
    if objective is not None and config.data.streams != 1:
        raise ValueError(f"data.streams={config.data.streams}: row streams feed next-token "
                         "training (SFT, pretraining); this trainer brings its own batches, "
                         "so leave data.streams at 1")
    objective = objective or sft_objective(
        config, train_examples, eval_examples,
        local_streams_of(batch_sharding, tc.batch_size, config.data.streams))
    calibration = None
    if config.prune.method in prune.CALIBRATED:
        if not train_examples:
            raise ValueError(f"prune.method={config.prune.method!r} calibrates on encoded "
                             "training examples, and this run has none")
        calibration = prune.calibration_rows(train_examples, tc.seq_len,
                                             config.prune.calibration_rows)
    tokenizer = tokenizer or D.load_tokenizer(config.data.tokenizer)
    state, state_shardings, trainable_mask, tx = initial_state(
        config, cfg, mesh, rules, init_params, tokenizer, objective.add_params,
        objective.trainable, calibration)
    del init_params
    record = run_record.describe(config, cfg, state.trainable, tokenizer, state.opt_state)

    with sharding.use(mesh, rules):
        step_fn = jit_train_step(objective.train_step, cfg, tx, tc.grad_accum, state_shardings,
                                 batch_sharding, mesh)
        eval_fn = jax.jit(functools.partial(objective.eval_step, model_cfg=cfg))
    data, eval_data = objective.batches, objective.eval_batches

    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
    best = Best(workdir, config) if config.checkpoint.keep_best and eval_data else None
    gradual = prune.is_gradual(config.prune)
    run_record.check_workdir(mngr, record, config.checkpoint.allow_changes)
    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(
        saved_part(state, gradual), saved_part(state_shardings, gradual)))
    start = 0
    if restored is not None:
        start, saved, data_state = restored
        state = saved.replace(frozen=ptree.merge(saved.frozen, state.frozen))
        data.restore(data_state)
        if jax.process_index() == 0:
            print(f"{os.path.basename(workdir)}: resuming at step {start} of {tc.steps} from "
                  f"{mngr.directory}", flush=True)
    log = metrics_lib.MetricsLog(workdir, resume_step=start)
    schedule = optim.learning_rate_schedule(config.optim, tc.steps)
    step_keys = jax.random.fold_in(jax.random.key(config.seed), 2)  # apart from the init keys

    last_metrics: dict = {}
    health = guard.initial_health(sharding.replicated(mesh))

    def save(done: int):
        checkpoint.save(mngr, done, saved_part(state, gradual), data.state(), run=record)

    with sharding.use(mesh, rules), preemption.Watch() as preempt, \
            _finish_on_error(mngr, best, log):
        bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc=os.path.basename(workdir),
                   disable=not show_progress or jax.process_index() != 0, dynamic_ncols=True)
        window_start, window_steps = time.perf_counter(), 0
        for step in bar:
            batch = to_device(next(data), batch_sharding)
            state, step_metrics = step_fn(state, batch, jax.random.fold_in(step_keys, step))
            health = guard.track(health, step_metrics["nonfinite"])
            window_steps += 1
            done = step + 1
            if prune.is_mask_update(config.prune, done):
                state = update_masks(state, config.prune, done, trainable_mask, state_shardings)
                log.write(done, {"prune/sparsity": prune.report(state.params)["overall"]})
            if step == start:  # keep compilation out of the throughput figure
                jax.block_until_ready(step_metrics)
                window_start, window_steps = time.perf_counter(), 0
            if done % tc.log_every == 0 or done == tc.steps:
                step_metrics = jax.device_get(step_metrics)
                elapsed = time.perf_counter() - window_start
                row = {f"train/{k}": v for k, v in step_metrics.items()}
                row["train/lr"] = float(schedule(step))
                if window_steps:
                    row["train/tokens_per_s"] = window_steps * objective.tokens_per_batch / elapsed
                health, row["train/skipped_steps"], too_many = guard.check(health, tc.max_bad_steps)
                log.write(done, row)
                if too_many:
                    checkpoint.finish(mngr, done)
                    raise guard.stop_error(too_many, done, tc.max_bad_steps, failures.last_good(
                        str(mngr.directory), checkpoint.latest_step(mngr)))
                last_metrics.update(row)
                bar.set_postfix(loss=f"{float(step_metrics['loss']):.4f}",
                                tok_s=f"{row.get('train/tokens_per_s', 0):.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if eval_data and config.eval.every and (done % config.eval.every == 0 or done == tc.steps):
                row = evaluate(eval_fn, state.params, eval_data, batch_sharding, objective.summarize)
                log.write(done, row)
                last_metrics.update(row)
                if best is not None:
                    best.offer(done, row, saved_part(state, gradual), data.state(), record)
            scheduled = done % config.checkpoint.every == 0 or done == tc.steps
            if scheduled:
                save(done)
            if preempt.reached(done):
                if not scheduled:
                    save(done)
                checkpoint.finish(mngr, done)
                raise failures.Preempted(done, str(mngr.directory))
        bar.close()
    checkpoint.finish(mngr, tc.steps)
    if best is not None:
        checkpoint.finish(best.mngr, tc.steps)

    if eval_data and "eval/loss" not in last_metrics:  # resumed a finished run: still report
        last_metrics.update(evaluate(eval_fn, state.params, eval_data, batch_sharding,
                                     objective.summarize))
    log.close()
    if jax.process_index() == 0:
        metrics_lib.plot_losses(workdir)
    params = state.params
    return Result(params=params, model_cfg=cfg, metrics=last_metrics,
                  trainable_params=ptree.count(state.trainable),
                  optimizer_state_bytes=ptree.nbytes(state.opt_state))


def read_summary(path: str) -> dict:
    """Load a summary.json (empty when absent), so stages can add to it."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_summary(path: str, summary: dict):
    """Write summary.json atomically (a kill never leaves half a file); process 0 writes it."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


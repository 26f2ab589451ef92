"""What a checkpoint belongs to, and the check that a resume continues that same run.

Why: a checkpoint holds only the trainable half of the state, so rerunning a command in an old
workdir with another base model, tokenizer, method, hyperparameters, batch or data would resume
silently into a different experiment (or fail deep in orbax with "tree structures do not match"
when the trainable set changed shape). Every checkpoint therefore carries a flat record of
`field -> value`; a resume compares it with the current run's, and refuses with one line per
changed field unless `checkpoint.allow_changes` names it (a field or any dotted prefix of it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax

from ptjax import tree as ptree
from ptjax.train.failures import ResumeMismatch

HEAD_BYTES = 1 << 20  # files are fingerprinted by size and the hash of their first MB
# A fixed text whose ids identify a tokenizer (merges, normalization, special tokens at the ends).
PROBE_TEXT = "The quick brown fox: 0123456789 jumps -- über naïve 東京 <tag> \n\t  end."
# Fields whose change makes the checkpoint's arrays unusable: never allowed.
SHAPE_FIELDS = ("trainable", "optimizer_state")


def file_fingerprint(path: str) -> dict:
    """`{path, size, sha256 of the first MB}` of a file: cheap for multi-GB weights, and it
    changes when a file is replaced, regenerated or truncated."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(HEAD_BYTES))
    return {"path": os.path.abspath(path), "size": os.path.getsize(path),
            "sha256_first_mb": digest.hexdigest()}


def base_fingerprint(init: str) -> dict | str:
    """The base model of `model.init`: its path and, for each config or weights file in it (or
    the file itself), size and the hash of its first MB (a safetensors or GGUF header and the
    start of the data)."""
    if not init:
        return "random"
    if os.path.isfile(init):
        return file_fingerprint(init)
    if not os.path.isdir(init):
        return {"path": init}
    names = sorted(n for n in os.listdir(init)
                   if n.endswith((".json", ".safetensors", ".gguf", ".bin", ".model")))
    digest = hashlib.sha256()
    for name in names:
        fp = file_fingerprint(os.path.join(init, name))
        digest.update(f"{name}:{fp['size']}:{fp['sha256_first_mb']};".encode())
    return {"path": os.path.abspath(init), "files": len(names), "sha256": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> dict:
    """A tokenizer by what it does: vocabulary size, special ids and the ids of a probe text."""
    if tokenizer is None:
        return {}
    ids = tokenizer.encode(PROBE_TEXT)
    return {"vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id),
            "probe_sha256": hashlib.sha256(repr(list(map(int, ids))).encode()).hexdigest()[:16]}


def data_fingerprint(path: str) -> dict | str:
    """A data file by path, size and first-MB hash; "" when the run uses generated data."""
    return file_fingerprint(path) if path and os.path.isfile(path) else path


def describe(config, model_cfg, trainable, tokenizer=None, opt_state=None) -> dict:
    """The flat record a checkpoint of this run carries: dotted field -> JSON value.

    `trainable` is the trainable half of the state (arrays or shapes), `opt_state` its optimizer
    state (its layout changes with e.g. `optim.clip_norm` turned on or off); `model_cfg` the
    resolved model config. Keys that only change how a run is carried out (logging, eval,
    checkpointing, mesh, progress) are left out, so changing them never blocks a resume.
    """
    record = {"trainer": config.trainer, "seed": config.seed,
              "model.init": base_fingerprint(config.model.init),
              "model.config": {k: str(v) for k, v in dataclasses.asdict(model_cfg).items()
                               if k != "remat"},  # recomputation changes memory, not results
              "tokenizer": tokenizer_fingerprint(tokenizer),
              "trainable": {p: list(map(int, x.shape))
                            for p, x in ptree.flatten_with_paths(trainable)}}
    if opt_state is not None:
        record["optimizer_state"] = {
            jax.tree_util.keystr(p): list(map(int, x.shape))
            for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
    for section in ("peft", "optim", "quant", "prune"):
        record.update(_flat(f"{section}.", config[section].to_dict()))
    record.update({f"train.{k}": config.train[k]
                   for k in ("steps", "batch_size", "seq_len", "grad_accum")})
    for key in ("truncate",):
        if key in config.data:
            record[f"data.{key}"] = config.data[key]
    for key in ("train", "eval"):
        record[f"data.{key}"] = data_fingerprint(config.data[key])
    if config.data.get("streams", 1) != 1:  # row streams decide the batches (1: not recorded,
        record["data.streams"] = config.data.streams  # as in records written before them)
    for section in ("reward", "dpo", "ppo", "grpo"):  # the objective's own hyperparameters
        if section in config and section == config.trainer:
            record.update(_flat(f"{section}.", config[section].to_dict()))
    return {k: _jsonable(v) for k, v in record.items()}


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(f"{prefix}{k}.", v))
        else:
            out[prefix + k] = v
    return out


def _jsonable(v):
    """Tuples become lists (what JSON gives back), so a saved record equals a fresh one."""
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


# Method sections and the `method` value that turns each off.
OFF_METHODS = {"peft": "full", "quant": "", "prune": ""}


def _effective(record: dict) -> dict:
    """The record without the settings of methods that are off (e.g. `prune.calibration_rows`
    while `prune.method` is ""): they change nothing a run computes, so they never block a
    resume. A method turned on or off still shows, as its `method` field."""
    off = [s for s, value in OFF_METHODS.items() if record.get(f"{s}.method", value) == value]
    return {k: v for k, v in record.items()
            if not any(k.startswith(s + ".") and k != f"{s}.method" for s in off)}


def changes(saved: dict, current: dict) -> dict:
    """field -> (saved value, current value) for every field that differs (missing = None),
    the settings of methods that are off left out on both sides."""
    saved, current = _effective(saved), _effective(current)
    return {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)}


def _allowed(field: str, allow: list[str]) -> bool:
    return any(field == a or field.startswith(a + ".") for a in allow)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def check_workdir(mngr, record: dict, allow_changes: str):
    """Check the newest checkpoint in `mngr`'s folder (if any) against this run's `record`
    before anything is restored from it (`check_resume`)."""
    from ptjax import checkpoint  # checkpoint imports ptjax.train.failures: import when used

    latest = mngr.latest_step()
    if latest is not None:
        check_resume(checkpoint.read_run(mngr, latest), record, allow_changes,
                     f"{mngr.directory}/{latest}")


def check_resume(saved: dict | None, current: dict, allow_changes: str, where: str):
    """Refuse to resume from the checkpoint `where` when its record differs from `current` in a
    field not in `allow_changes` (comma-separated fields or prefixes, e.g. "optim,data.train"),
    with one line per change; a change of the trainable shapes is refused even when allowed
    (the saved arrays cannot fit). Checkpoints without a record (older ones) pass."""
    if saved is None:
        return
    allow = [a.strip() for a in allow_changes.split(",") if a.strip()]
    diff = changes(saved, current)
    refused = {k: v for k, v in diff.items() if not _allowed(k, allow)}
    impossible = {k: v for k, v in diff.items() if k in SHAPE_FIELDS}
    if not refused and not impossible:
        return
    lines = [f"  {k}: {_short(a)} -> {_short(b)}" for k, (a, b) in refused.items()]
    if impossible:
        details = []
        for field, (saved_t, cur_t) in impossible.items():
            saved_t, cur_t = saved_t or {}, cur_t or {}
            gone = sorted(set(saved_t) - set(cur_t))
            new = sorted(set(cur_t) - set(saved_t))
            reshaped = sorted(p for p in set(saved_t) & set(cur_t) if saved_t[p] != cur_t[p])
            details.append(f"{field}: " + "; ".join(
                f"{what} {len(ps)} (e.g. {ps[0]})" for what, ps in
                (("no longer present", gone), ("new", new), ("reshaped", reshaped)) if ps))
        others = [line for line in lines if line.split(":")[0].strip() not in SHAPE_FIELDS]
        raise ResumeMismatch(
            f"resume: {where} was written by a run with other trainable parameters or optimizer "
            f"state ({'; '.join(details)}), so its arrays cannot be restored into this run; use a "
            "new workdir (or delete its checkpoints)"
            + ("; other changes:\n" + "\n".join(others) if others else ""))
    raise ResumeMismatch(
        f"resume: {where} belongs to a different run; changed since it was written:\n"
        + "\n".join(lines)
        + f"\nUse a new workdir, or pass --config.checkpoint.allow_changes="
        f"{','.join(refused)} to resume with these changes.")

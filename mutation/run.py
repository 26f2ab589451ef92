"""Mutation check of ptjax's core with cosmic-ray: a fixed, seeded sample of mutants.

    pip install -e '.[test,mutation]'
    python mutation/run.py                   # 300 mutants, 2 workers, under an hour on 2 cores
    python mutation/run.py --only-survivors  # after new tests: survivors and edited lines only
    python mutation/run.py --module ptjax/sampling.py   # rerun one [[module]] entry

Why a sample: the core (mutation/modules.toml) holds about 3,750 mutants (2,050 after the operator
filter) and each needs a pytest run that compiles JAX programs, far too many to run whole. Which mutants are in the sample does not
depend on the order of the code: every mutant gets a key (module, operator, the text of its line,
its column), and the sample is the `--sample` mutants whose salted hash of that key is smallest.
Editing one function therefore moves only that function's mutants in or out.

How: one cosmic-ray session per [[module]] entry (its own test command: the tests that cover those
files, `-x`), mutants outside the sample marked skipped in the session database (the way
cosmic-ray's own filters do), and `cosmic-ray exec` with the http distributor over `--workers`
`cosmic-ray http-worker`s, each in its own copy of the tree (mutants are written to disk, so two
workers must never share files). JAX's persistent compilation cache is shared by the workers.

Mutants listed in mutation/equivalent.toml (with the reason they cannot change behaviour) are not
run and count neither way. Every outcome goes to WORKDIR/results.json (key -> outcome) as each
session ends, so partial runs and reruns add up; a full run starts it afresh. Prints, and writes
to WORKDIR/report.md, the mutation score per module over the whole sample
(killed / (killed + survived)) and the diff of every surviving mutant. Exit status 1 when the
total score is under `--min-score`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
COPIED = ("ptjax", "tests", "configs", "launch.py", "pyproject.toml")


def mutant_keys(work_db, lines_of) -> dict[str, str]:
    """{job id: key} for every mutant of a session. A key is `module:operator:line text:column`,
    stable under edits elsewhere in the file; mutants sharing one (NumberReplacer's +1 and -1 of
    the same number) get `#1`, `#2`, ... in cosmic-ray's occurrence order."""
    items = sorted(work_db.work_items, key=lambda it: (str(it.mutations[0].module_path),
                                                       it.mutations[0].operator_name,
                                                       it.mutations[0].occurrence))
    keys, seen = {}, {}
    for item in items:
        m = item.mutations[0]
        line, col = m.start_pos
        text = lines_of(str(m.module_path))[line - 1].strip()
        key = f"{m.module_path}:{m.operator_name}:{text}:{col}"
        n = seen.get(key, 0)
        seen[key] = n + 1
        keys[item.job_id] = key if n == 0 else f"{key}#{n}"
    return keys


def load_equivalents() -> dict[str, str]:
    """{mutant key: reason} from mutation/equivalent.toml."""
    path = HERE / "equivalent.toml"
    if not path.exists():
        return {}
    import toml  # cosmic-ray's own TOML reader (tomllib needs Python 3.11)

    return {e["key"]: e["reason"] for e in toml.load(path).get("equivalent", [])}


def session_config(entry: dict, excluded: list[str], urls: list[str]) -> str:
    """A cosmic-ray config (TOML text) for one [[module]] entry."""
    tests = " ".join(entry["tests"])
    command = (f"{sys.executable} -m pytest -x -q -p no:xdist -p no:cacheprovider "
               f"-m 'not slow' {tests}")
    paths = ", ".join(json.dumps(p) for p in entry["paths"])
    return "\n".join([
        "[cosmic-ray]",
        f"module-path = [{paths}]",
        f"timeout = {float(entry['timeout'])}",
        "excluded-modules = []",
        f"test-command = {json.dumps(command)}",
        "[cosmic-ray.distributor]",
        'name = "http"',
        "[cosmic-ray.distributor.http]",
        f"worker-urls = {json.dumps(urls)}",
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = {json.dumps(excluded)}",
        "",
    ])


def start_workers(workdir: Path, n: int, base_port: int) -> list:
    """`n` http workers, each serving from its own copy of the tree."""
    cache = workdir / "jax_cache"
    cache.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        tree = workdir / f"worker{i}"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, tree / name)
        env = dict(os.environ, PYTHONPATH=str(tree), PTJAX_NO_REEXEC="1",
                   JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        port = base_port + i
        log = open(workdir / f"worker{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve", str(port)],
                                      cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT))
    time.sleep(3)
    for p in procs:
        if p.poll() is not None:
            raise SystemExit(f"a cosmic-ray http-worker exited at start; see {workdir}/worker*.log")
    return procs


def serve(port: int):
    """cosmic-ray's http worker (`cosmic-ray http-worker`), listening on loopback only."""
    from aiohttp import web
    from cosmic_ray.distribution.http import handle_mutate_and_test

    app = web.Application()
    app.add_routes([web.post("/", handle_mutate_and_test)])
    web.run_app(app, host="127.0.0.1", port=port)


def cosmic_ray(*args, cwd=ROOT):
    subprocess.run([sys.executable, "-m", "cosmic_ray.cli", *args], cwd=cwd, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, default=300, help="mutants to run (all modules)")
    parser.add_argument("--seed", default="ptjax-0", help="salt of the sample's hash")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=9871, help="first worker port (127.0.0.1)")
    parser.add_argument("--module", action="append", default=[],
                        help="only entries holding this path (repeatable)")
    parser.add_argument("--workdir", default=str(ROOT / "mutation" / ".work"))
    parser.add_argument("--list", action="store_true", help="print the sample and exit")
    parser.add_argument("--min-score", type=float, default=0.9)
    parser.add_argument("--only-survivors", action="store_true",
                        help="run only the sampled mutants that survived earlier runs or have "
                             "no result yet (new tests, edited lines)")
    parser.add_argument("--report-only", action="store_true",
                        help="report the current sample from recorded results, running nothing")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: one worker
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    import toml

    spec = toml.load(HERE / "modules.toml")
    entries = spec["module"]  # the sample is drawn over all of them, whatever --module says
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    equivalents = load_equivalents()
    urls = [f"http://127.0.0.1:{args.port + i}" for i in range(args.workers)]

    lines: dict[str, list[str]] = {}

    def lines_of(path):
        if path not in lines:
            lines[path] = (ROOT / path).read_text().splitlines()
        return lines[path]

    ledger_path = workdir / "results.json"  # key -> outcome, over this and earlier runs
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}

    # 1. One session per entry with every mutant, operators filtered as cosmic-ray's filter does.
    sessions = []
    for i, entry in enumerate(entries):
        config, db = workdir / f"session{i}.toml", workdir / f"session{i}.sqlite"
        config.write_text(session_config(entry, spec["exclude-operators"], urls))
        cosmic_ray("init", str(config), str(db), "--force")
        subprocess.run([sys.executable, "-m", "cosmic_ray.tools.filters.operators_filter",
                        str(db), str(config)], cwd=ROOT, check=True)
        sessions.append((entry, config, db))

    # 2. The seeded sample across all sessions; the rest (and known equivalents) are skipped.
    candidates = []  # (hash, key, session index, job id)
    for s, (_, _, db) in enumerate(sessions):
        with use_db(str(db), WorkDB.Mode.open) as work_db:
            keys = mutant_keys(work_db, lines_of)
            for item in work_db.pending_work_items:
                key = keys[item.job_id]
                digest = hashlib.sha256(f"{args.seed}|{key}".encode()).hexdigest()
                candidates.append((digest, key, s, item.job_id))
    candidates.sort()
    stale = sorted(set(equivalents) - {c[1] for c in candidates})
    if stale:
        print("mutation/equivalent.toml names mutants that no longer exist:", *stale, sep="\n  ")
    chosen = {c[3]: c[1] for c in candidates[:args.sample]}
    run_keys = set(chosen.values())
    if args.only_survivors:
        run_keys = {k for k in run_keys if ledger.get(k, {}).get("outcome", "survived") == "survived"}
    total = len(candidates)
    for s, (_, _, db) in enumerate(sessions):
        with use_db(str(db), WorkDB.Mode.open) as work_db:
            for _, key, owner, job in candidates:
                if owner != s:
                    continue
                if job not in chosen or key not in run_keys:
                    work_db.set_result(job, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                                       output="not in sample"))
                elif key in equivalents:
                    work_db.set_result(job, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                                       output="equivalent: " + equivalents[key]))
    print(f"{total} mutants after the operator filter; sample of {len(chosen)} (seed {args.seed!r})")
    if args.list:
        for key in sorted(chosen.values()):
            print(("[equivalent] " if key in equivalents else "") + key)
        return 0
    if args.report_only:
        return report(entries, chosen, equivalents, ledger, workdir, None, args.min_score)

    # 3. Run the sample on the workers, one session after another, recording as it goes.
    if not args.module and not args.only_survivors:
        ledger = {}  # a full run replaces every earlier result
    procs = start_workers(workdir, args.workers, args.port)
    started = time.time()
    try:
        for session in sessions:
            entry, config, db = session
            if args.module and not any(m in entry["paths"] for m in args.module):
                continue
            print(f"== {' '.join(entry['paths'])}", flush=True)
            cosmic_ray("exec", str(config), str(db))
            record([session], chosen, ledger)
            ledger_path.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()

    # 4. Scores (over the whole sample, from this run and the ledger) and survivors.
    return report(entries, chosen, equivalents, ledger, workdir, time.time() - started,
                  args.min_score)


def record(sessions, chosen, ledger):
    """Add the outcome of every mutant this run executed to `ledger` (key -> outcome, diff)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome

    for _, _, db in sessions:
        with use_db(str(db), WorkDB.Mode.open) as work_db:
            for item, result in work_db.completed_work_items:
                if item.job_id not in chosen or result.worker_outcome == WorkerOutcome.SKIPPED:
                    continue
                outcome = result.test_outcome or result.worker_outcome
                ledger[chosen[item.job_id]] = {"outcome": str(outcome.value),
                                               "diff": result.diff or ""}


def report(entries, chosen, equivalents, ledger, workdir, elapsed, min_score) -> int:
    """Print and write the per-module score over the whole sample, and every survivor's diff."""
    rows, survivors = [], []
    killed_all = scored_all = 0
    for entry in entries:
        keys = [k for k in chosen.values()
                if any(k.split(":")[0].startswith(p) for p in entry["paths"])]
        counts = dict.fromkeys(("equivalent", "killed", "survived", "incompetent", "not run"), 0)
        for key in keys:
            if key in equivalents:
                counts["equivalent"] += 1
                continue
            outcome = ledger.get(key, {}).get("outcome", "not run")
            counts[outcome if outcome in counts else "incompetent"] += 1
            if outcome == "survived":
                survivors.append((key, ledger[key]["diff"]))
        scored = counts["killed"] + counts["survived"]
        killed_all += counts["killed"]
        scored_all += scored
        score = counts["killed"] / scored if scored else 1.0
        rows.append(f"| {', '.join(entry['paths'])} | {len(keys)} | {counts['equivalent']} "
                    f"| {counts['incompetent']} | {counts['not run']} | {counts['killed']} "
                    f"| {counts['survived']} | {score:.0%} |")
    total = killed_all / scored_all if scored_all else 1.0
    out = ["| modules | sampled | equivalent | incompetent | not run | killed | survived | score |",
           "|---|---|---|---|---|---|---|---|", *rows,
           f"| **all** | {len(chosen)} | | | | {killed_all} | {scored_all - killed_all} "
           f"| **{total:.1%}** |", "",
           (f"This run: {elapsed / 60:.1f} min. " if elapsed else "") + "Score = killed / (killed + survived); equivalent "
           "mutants (mutation/equivalent.toml) and incompetent ones (the mutated code fails to "
           "import or the worker failed) count neither way.", ""]
    if survivors:
        out.append("## Surviving mutants\n")
        for key, diff in sorted(survivors):
            out += [f"key = {json.dumps(key)}", "```diff", diff.strip(), "```", ""]
    text = "\n".join(out)
    print(text)
    (workdir / "report.md").write_text(text)
    return 0 if total >= min_score else 1


if __name__ == "__main__":
    sys.exit(main())

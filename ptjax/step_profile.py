"""Where a compiled step spends its time, by operation, from a `jax.profiler` trace.

Why: the benchmark's tokens/s and MFU say how far a step is from the matmul roof, not what fills
the gap. This runs a compiled program a few times under the profiler, reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed), and charges every traced event that is an
instruction of the program (on CPU, XLA's thunks: fusions, dots, loops) to the JAX operation it
came from (the instruction's `op_name` metadata, e.g. `transpose(jvp())/dot_general` for a
backward matmul), so "the attention softmax" or "float32 <-> bf16 casts" become a number.

Times are summed over every thread the runtime uses, so on a CPU they add up to the threads'
busy time, not to the wall time (two cores: up to twice the step).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

import jax

# an HLO instruction line: `%name = type opcode(...), ..., metadata={op_name="..." ...}`
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(.*?metadata=\{op_name=\"([^\"]*)\"",
    re.MULTILINE)
# instructions whose traced span contains their body's instructions (counted on their own)
_CONTAINERS = ("while", "conditional", "call")


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its JAX op_name (the `jit(...)/` prefix dropped) for every instruction
    of an HLO module's text that carries one, loops and other containers left out."""
    names = {}
    for name, opcode, op in _INSTRUCTION.findall(hlo_text):
        if opcode not in _CONTAINERS:
            names[name] = re.sub(r"^jit\([^)]*\)/", "", op)
    return names


def short_op(op: str) -> str:
    """`jvp()/while/body/closed_call/dot_general` -> `forward/dot_general`: the pass (forward,
    backward or neither) and the primitive, the levels a profile is read by."""
    kind = "backward" if op.startswith("transpose(") else "forward" if op.startswith("jvp(") \
        else "other"
    return f"{kind}/{op.rsplit('/', 1)[-1]}"


def trace_events(run, steps: int, trace_dir: str) -> list[tuple[str, int]]:
    """(event name, duration ns) of every event traced while `run()` is called `steps` times
    (each call must block until its result is ready)."""
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            run()
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    return [(event.name, event.duration_ns) for plane in data.planes for line in plane.lines
            for event in line.events]


def profile(compiled, run, steps: int = 2, top: int = 15) -> dict:
    """Per-step time of `compiled`'s operations while `run()` executes it `steps` times.

    Returns `{"traced_ms": ..., "matmul_share": ..., "ops": [{"op", "ms", "share", "calls"}]}`
    with the `top` operations by time (`short_op` names; `ms` and `calls`, the instructions
    executed, per step; `share` of all traced instruction time). `matmul_share` is the part in dot_general (matmuls and the fusions XLA
    builds around them).
    """
    ops = {name: short_op(op) for name, op in op_names(compiled.as_text()).items()}
    with tempfile.TemporaryDirectory() as trace_dir:
        events = trace_events(run, steps, trace_dir)
    per_op: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for name, ns in events:
        if name in ops:
            per_op[ops[name]] += ns
            calls[ops[name]] += 1
    total = sum(per_op.values())
    if not total:
        raise RuntimeError("the trace holds no event of the compiled program's instructions")
    matmul = sum(ns for op, ns in per_op.items() if op.endswith("/dot_general"))
    return {
        "traced_ms": round(total / steps / 1e6, 1),
        "matmul_share": round(matmul / total, 3),
        "ops": [{"op": op, "ms": round(ns / steps / 1e6, 1), "share": round(ns / total, 3),
                 "calls": round(calls[op] / steps, 1)} for op, ns in per_op.most_common(top)],
    }

"""Two variants of the train step, compiled in one process and timed alternately.

    python benchmarks/ab_step.py --method=qlora --variant=my_variant.py --rounds=8

Why: this project's CPUs change speed by up to 20% between processes (and between minutes), so
two separate benchmark runs cannot tell a 3% change from noise. Here variant A is the step as the
tree builds it and variant B the same step traced while `my_variant.py`'s `patched()` context
manager is active; both are compiled first, then called in alternating order (ABBA...), and the
medians of their step times are compared. A variant file monkeypatches what it changes, e.g.:

    import contextlib
    from ptjax.models import llama

    @contextlib.contextmanager
    def patched():
        old = llama.CAUSAL_BLOCK
        llama.CAUSAL_BLOCK = 256
        try:
            yield
        finally:
            llama.CAUSAL_BLOCK = old

Prints each variant's loss (a variant must compute the same step), XLA scratch memory, median
step time and tokens/s. The README's "Performance" section quotes runs of this script.
"""

import sys

from ptjax import runtime

runtime.reexec_with_fast_allocator()

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from ptjax import bench  # noqa: E402
from ptjax.models.config import preset  # noqa: E402

# --preset, --method, --batch, --seq and --dtype are ptjax.bench's flags (the first value of each)
flags.DEFINE_string("variant", None, "Python file defining a `patched()` context manager.")
flags.DEFINE_integer("rounds", 8, "Timed calls of each variant (the first of each is dropped).")
flags.mark_flag_as_required("variant")
FLAGS = flags.FLAGS


def load_variant(path: str):
    """The `patched` context manager of the Python file at `path`."""
    spec = importlib.util.spec_from_file_location("ab_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "patched"):
        raise ValueError(f"--variant {path}: defines no patched() context manager")
    return module.patched


def main(argv):
    del argv
    patched = load_variant(FLAGS.variant)
    seq = int(FLAGS.seq[0])
    cfg = preset(FLAGS.preset, dtype=FLAGS.dtype[0])
    # not donated: both variants start every call from the same state
    step, state, data = bench.train_step_case(cfg, FLAGS.method[0], FLAGS.batch, seq,
                                              donate=False)
    key = jax.random.key(1)
    variants = {}
    for name, context in (("A", contextlib.nullcontext()), ("B", patched())):
        with context:  # the variant's patches are read while the step is traced
            compiled = step.lower(state, data, key).compile()
        _, metrics = compiled(state, data, key)
        scratch = compiled.memory_analysis().temp_size_in_bytes / 2**20
        print(f"{name}: loss {float(metrics['loss']):.6f}, XLA scratch {scratch:.1f} MB", flush=True)
        variants[name] = compiled
    times = {"A": [], "B": []}
    for r in range(FLAGS.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            compiled = variants[name]
            t = time.perf_counter()
            jax.block_until_ready(compiled(state, data, key))
            times[name].append(time.perf_counter() - t)
    tokens = FLAGS.batch * seq
    for name in ("A", "B"):
        step_s = float(np.median(times[name][1:]))
        print(f"{name}: median step {step_s:.4f} s, {tokens / step_s:,.0f} tokens/s "
              f"(steps: {', '.join(f'{t:.3f}' for t in times[name][1:])})", flush=True)


if __name__ == "__main__":
    sys.exit(app.run(main))

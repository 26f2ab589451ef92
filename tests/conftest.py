"""Test setup, set before JAX is imported: 8 simulated CPU devices for the sharding tests, and
XLA's backend (LLVM) optimization level 0.

Why level 0: the suite's tiny programs spend most of their time compiling, not running, and the
LLVM passes are most of a CPU compile; at level 0 the suite runs about a quarter faster (three
of its heaviest tests: 41.6 -> 30.1 s). It changes how the CPU code is generated, not what it
computes: every test compares against references with tolerances. Benchmarks and runs keep the
default level.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("PTJAX_NO_REEXEC", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def causal_block(request, monkeypatch):
    """Attention's query-block size for one test (0: the default), set by indirect
    parametrization. Tiny test sequences are shorter than the default block, so the blocked
    path runs only with a small size; jit caches are cleared on both sides so no trace compiled
    under the other size is reused (module-level jitted functions would hit it)."""
    size = request.param
    if size:
        from ptjax.models import llama

        monkeypatch.setattr(llama, "CAUSAL_BLOCK", size)
        jax.clear_caches()
    yield size
    if size:
        jax.clear_caches()

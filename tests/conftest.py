"""Test setup: 8 simulated CPU devices for the sharding tests; set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
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

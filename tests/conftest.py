"""Test setup: 8 simulated CPU devices for the sharding tests; set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("PTJAX_NO_REEXEC", "1")

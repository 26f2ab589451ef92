"""Process-level settings that must exist before JAX (or the C allocator) starts.

glibc's default malloc hands XLA's large temporary buffers back to the kernel after every step
and faults them in again (about a million page faults per step measured on the benchmark model);
keeping freed memory in-process removes that cost. The setting is read by glibc at process start,
so the entry points re-execute themselves once with it. Users never need to know it.
"""

from __future__ import annotations

import os
import sys

FAST_ALLOCATOR = (
    "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:"
    "glibc.malloc.arena_max=1")
# The concurrency-optimized scheduler trades 20-40% more temp memory for no speed on CPU.
XLA_CPU_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def reexec_with_fast_allocator():
    """Re-run this exact command with the allocator and XLA settings, unless already set.

    Set PTJAX_NO_REEXEC=1 to opt out (e.g. under a debugger).
    """
    if os.environ.get("PTJAX_NO_REEXEC") or "GLIBC_TUNABLES" in os.environ:
        return
    if "jax" in sys.modules:  # too late to change anything for this process
        return
    env = dict(os.environ, GLIBC_TUNABLES=FAST_ALLOCATOR)
    flags = env.get("XLA_FLAGS", "")
    if "concurrency_optimized_scheduler" not in flags:
        env["XLA_FLAGS"] = (flags + " " + XLA_CPU_FLAGS).strip()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def simulate_host_devices_for_plan(argv: list[str]):
    """For `bench --plan --mesh=...`: let the CPU backend present as many devices as the mesh
    names (XLA's host device count, read once when JAX starts), so a plan for 8 accelerators
    compiles on a laptop. No effect without `--plan`, or when XLA_FLAGS already sets a count."""
    if "--plan" not in argv and "--plan=true" not in [a.lower() for a in argv]:
        return
    mesh = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), "")
    n = 1
    for part in filter(None, mesh.split(",")):
        size = part.partition(":")[2]
        n *= int(size) if size.isdigit() else 1
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()

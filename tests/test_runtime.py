"""The process settings the entry points re-execute with take effect."""

import os
import subprocess

import pytest

from ptjax import runtime

LOADER = "/lib64/ld-linux-x86-64.so.2"


def _effective_tunables(value: str) -> dict:
    out = subprocess.run([LOADER, "--list-tunables"], env=dict(os.environ, GLIBC_TUNABLES=value),
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(": ", 1)[0:2] for line in out.splitlines() if ": " in line)


@pytest.mark.skipif(not os.path.exists(LOADER), reason="needs glibc's x86-64 loader")
def test_every_allocator_setting_reaches_glibc():
    """glibc reads only full tunable names: `glibc.malloc.hugetlb=1:mmap_max=0` sets hugetlb and
    silently drops the rest (which left freed memory to be faulted in again every step)."""
    try:
        default = _effective_tunables("")
    except subprocess.CalledProcessError:
        pytest.skip("this glibc has no --list-tunables")
    got = _effective_tunables(runtime.FAST_ALLOCATOR)
    for item in runtime.FAST_ALLOCATOR.split(":"):
        name, value = item.split("=")
        assert name in got, f"{name} is not a glibc tunable"
        assert got[name].split(" ")[0] == hex(int(value)) or got[name].startswith(value), (
            name, got[name])
    changed = [n for n in got if got[n] != default.get(n)]
    assert len(changed) >= len(runtime.FAST_ALLOCATOR.split(":")) - 1, changed  # mmap_max=0 reads as unset

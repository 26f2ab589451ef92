"""Fine-tuning a checkpoint through launch.py: the model, tokenizer and chat template come from
the checkpoint (a GGUF file here), and the exported folder is a complete, loadable model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from ptjax.data import encode_chat_prompt, write_jsonl
from ptjax.interop import export, load
from ptjax.models import llama
from ptjax.recipes import sft
from ptjax.train.config import base_config
from tiny_checkpoint import CHATML, bpe_tokenizer, write_chat_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    write_chat_model(root / "hf")
    model = load.load(str(root / "hf"))
    export.save_gguf(model.params, model.config, model.tokenizer, str(root / "model.gguf"),
                     dtype="F32")
    return root


def test_base_comes_from_the_checkpoint(gguf_model, tmp_path):
    config = base_config()
    config.model.init = str(gguf_model / "hf")
    cfg, params, tokenizer, generation = sft.load_base(config)
    assert cfg.layers == 2 and cfg.tie_embeddings and cfg.rope_theta == 10000.0
    assert tokenizer.chat_template == CHATML and generation["eos_token_id"] == [2, 0]
    config.model.preset = "demo"
    with pytest.raises(ValueError, match="model.preset does not match the checkpoint"):
        sft.load_base(config)
    config.model.preset = ""
    bigger = bpe_tokenizer()
    bigger.add_tokens([f"<extra_{i}>" for i in range(50)])  # more tokens than embedding rows
    bigger.save(str(tmp_path / "tokenizer.json"))
    config.data.tokenizer = str(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"data.tokenizer: \d+ tokens.*only \d+ embedding rows"):
        sft.load_base(config)


@pytest.mark.slow  # CI keeps GGUF loading (tests/test_interop_gguf.py) and a launch + export run
# (tests/test_peft_run.py's QLoRA run)
def test_lora_on_a_gguf_checkpoint_exports_a_complete_model(gguf_model, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": f"sort {n}"},
                                     {"role": "assistant", "content": "".join(sorted(str(n)))}]}
                       for n in range(100, 160)])
    workdir = tmp_path / "run"
    subprocess.run([sys.executable, os.path.join(REPO, "launch.py"),
                    "--config=" + os.path.join(REPO, "configs/sft.py") + ":peft=lora",
                    f"--workdir={workdir}", f"--config.model.init={gguf_model / 'model.gguf'}",
                    f"--config.data.train={data}", "--config.train.steps=4",
                    "--config.train.batch_size=4", "--config.train.seq_len=64",
                    "--config.eval.every=0", "--config.peft.rank=4", "--config.optim.lr=0.05"],
                   check=True, env=dict(os.environ, PTJAX_NO_REEXEC="1", XLA_FLAGS=""),
                   capture_output=True)
    base = load.load(str(gguf_model / "model.gguf"))
    tuned = load.load(str(workdir))  # the run directory: its merged model
    assert tuned.config == base.config
    assert tuned.tokenizer.chat_template == CHATML and tuned.tokenizer.stop_ids == (2, 0)
    messages = [("user", "sort 3912")]
    np.testing.assert_array_equal(encode_chat_prompt(messages, tuned.tokenizer),
                                  encode_chat_prompt(messages, base.tokenizer))
    adapter = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(gguf_model / "model.gguf")
    # The merged weights equal the base with the adapter applied, and differ from the base.
    with_adapter = load.load(str(gguf_model / "model.gguf"), adapter=str(workdir / "adapter"))
    tokens = np.asarray([encode_chat_prompt(messages, base.tokenizer)])
    forward = jax.jit(llama.forward, static_argnums=1)
    merged_logits = np.asarray(forward(tuned.params, tuned.config, tokens))
    np.testing.assert_allclose(merged_logits, forward(with_adapter.params, base.config, tokens),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(merged_logits - np.asarray(forward(base.params, base.config, tokens))).max() > 1e-3
    chex.assert_trees_all_equal_shapes(tuned.params, base.params)

"""`python -m ptjax.generate` end to end on a tiny chat model folder: the streamed greedy reply
equals the sampler's, rendered through the model's chat template, and stops at a stop string."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np

from ptjax import sampling
from ptjax.data import encode_chat_prompt
from ptjax.interop import load
from tiny_checkpoint import write_chat_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "ptjax.generate", *args], check=True,
                         capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PTJAX_NO_REEXEC="1", XLA_FLAGS=""))
    return out.stdout


def test_greedy_chat_reply_equals_the_sampler(tmp_path):
    folder = tmp_path / "model"
    write_chat_model(folder)  # its generation_config samples (do_sample, temperature 0.7)
    model = load.load(str(folder))
    ids = encode_chat_prompt([("user", "Hello, world!")], model.tokenizer)
    tokens, mask = sampling.left_pad([ids], len(ids), model.tokenizer.pad_id)
    result = sampling.generate(model.params, model.config, tokens, mask, jax.random.key(0),
                               max_new_tokens=12, eos_id=model.tokenizer.stop_ids,
                               pad_id=model.tokenizer.pad_id)
    n = int(result["lengths"][0])
    want = model.tokenizer.decode(np.asarray(result["tokens"][0])[:n])
    assert len(want) > 3
    stdout = run_cli(f"--model={folder}", "--chat", "--prompt=Hello, world!", "--max_new_tokens=12",
                     "--temperature=0", f"--stop={want[2:4]}")
    # The stop string (two characters from the greedy reply) cuts it where it first appears.
    assert stdout == want[:want.index(want[2:4])] + "\n"

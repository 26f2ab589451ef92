"""Perplexity of SmolLM2-135M-Instruct (its GGUF, dequantized to float32) dense, with 50%
magnitude pruning, 50% Wanda and 50% SparseGPT, on the Python documentation topics that ship with every
Python (`pydoc_data.topics`): the setup issue 7 quotes transformers' figures for (dense 11.1,
magnitude 227, Wanda 21.0).

    python benchmarks/wanda_smollm2.py --gguf=$(python -m ptjax.interop.fetch smollm2)

Topics joined by "\\n\\n" in sorted-key order, tokenized without BOS; the first 64 x 512 tokens
calibrate, the last 32 x 512 evaluate; every q/k/v/o/gate/up/down projection is pruned 50% per
output (embeddings and head dense).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pydoc_data.topics

from ptjax import prune
from ptjax.interop import load
from ptjax.models import llama
from ptjax.prune import masks
from ptjax.train.config import base_config


def perplexity(params, cfg, rows, batch=4):
    forward = jax.jit(llama.forward, static_argnums=1)
    nll, count = 0.0, 0
    for s in range(0, len(rows), batch):
        x = jnp.asarray(rows[s:s + batch])
        logp = jax.nn.log_softmax(forward(params, cfg, x)[:, :-1].astype(jnp.float32), -1)
        nll -= float(jnp.sum(jnp.take_along_axis(logp, x[:, 1:, None], -1)))
        count += x[:, 1:].size
    return float(np.exp(nll / count))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--calibration_rows", type=int, default=64)
    p.add_argument("--eval_rows", type=int, default=32)
    args = p.parse_args()
    started = time.time()
    model = load.load(args.gguf)
    cfg, params = model.config, jax.device_get(model.params)
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = np.asarray(model.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    n = args.seq
    calib = ids[:args.calibration_rows * n].reshape(-1, n)
    evaluation = ids[-args.eval_rows * n:].reshape(-1, n)
    results = {"tokens": int(ids.size), "dense": perplexity(params, cfg, evaluation)}
    c = base_config().prune
    weights = prune.targets(params, c)
    magnitude = prune.with_masks(params, {p: masks.per_output(np.abs(w), 0.5)
                                          for p, w in weights.items()})
    results["magnitude"] = perplexity(magnitude, cfg, evaluation)
    c.method, c.sparsity = "wanda", 0.5
    wanda = prune.apply(params, c, cfg, calib)
    results["wanda"] = perplexity(wanda, cfg, evaluation)
    c.method = "sparsegpt"
    results["sparsegpt"] = perplexity(prune.apply(params, c, cfg, calib), cfg, evaluation)
    results["seconds"] = round(time.time() - started, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

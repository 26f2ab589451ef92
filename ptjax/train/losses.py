"""Loss helpers shared by the train steps."""

from __future__ import annotations

import jax.numpy as jnp

from ptjax import ops
from ptjax.models import llama
from ptjax.peft import prompts


def next_token_nll(params, cfg, batch, rng=None):
    """Summed weighted next-token NLL over a packed batch, plus token and hit counts.

    Returns sums, not means, so gradient accumulation over microbatches divides once by the
    total token count and equals one large batch exactly. The output head runs through the
    fused chunked cross-entropy (no [b, s, vocab] logits in memory). `rng` feeds training-time
    randomness such as LoRA dropout (None: deterministic, as in evaluation). Soft prompts and
    prefixes in `params` enter through `prompts.model_inputs`, as in the sampler.
    """
    inputs_embeds, positions, prefix = prompts.model_inputs(params, cfg, batch["inputs"],
                                                            batch["positions"])
    h = llama.hidden_states(params, cfg, inputs_embeds, positions, batch["segment_ids"],
                            prefix=prefix, rng=rng)
    w, vocab_major = llama.output_head(params, cfg)
    weights = batch["loss_mask"].astype(jnp.float32)
    nll_sum, correct = ops.fused_cross_entropy(
        h.reshape(-1, h.shape[-1]), ops.materialize(w), jnp.maximum(batch["targets"], 0).reshape(-1),
        weights.reshape(-1), cfg.compute_dtype, vocab_major)
    return nll_sum, {"tokens": jnp.sum(weights), "correct": correct}

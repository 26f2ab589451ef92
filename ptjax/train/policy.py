"""A language model as a policy: log-probs of given sequences, and the frozen reference.

Rows hold one sequence each (prompt then response), left- or right-padded; `mask` is 1 at real
tokens. Positions count real tokens only (`sampling.positions_from_mask`), so a left-padded
rollout is scored at the positions it was sampled at, and the log-probs here equal the sampler's
(`tests/test_alignment.py` checks that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax import nodes
from ptjax.models import llama
from ptjax.peft import adapters, ia3, lora
from ptjax.train import rl_math

F32 = jnp.float32

# Weight nodes that are a fine-tuning method's and not the base's: switching them off (taking
# their `base`) gives back the model before fine-tuning. Quantized and pruned bases stay.
ADAPTER_NODES = (lora.LoRA, lora.DoRA, ia3.IA3, adapters.Adapter)


def token_logits(params, cfg, tokens, mask, rng=None):
    """Float32 logits [b, s, vocab] of every position (the next token's distribution)."""
    mask = jnp.asarray(mask).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    h = llama.hidden_states(params, cfg, llama.embed_tokens(params, cfg, jnp.maximum(tokens, 0)),
                            positions, mask, rng=rng)
    return llama.logits_from_hidden(params, cfg, h)


def token_logprobs(params, cfg, tokens, mask, *, temperature: float = 1.0, rng=None,
                   with_entropy: bool = False):
    """log p(tokens[:, t] | tokens[:, :t]) as float32 [b, s], aligned with `tokens` (0 at t = 0).

    Why aligned with the tokens rather than shifted: the response mask of a rollout or a
    preference pair then selects the log-probs directly. `temperature` must be the sampler's, so
    PPO's ratios compare the distribution that sampled. With `with_entropy`, also the entropy of
    the predicted distribution at each position (same alignment).
    """
    logits = token_logits(params, cfg, tokens, mask, rng)[:, :-1]
    logp = rl_math.logprobs_from_logits(logits, tokens[:, 1:], temperature)
    logp = jnp.pad(logp, ((0, 0), (1, 0)))
    if not with_entropy:
        return logp
    entropy = rl_math.entropy_from_logits(logits.astype(F32) / temperature)
    return logp, jnp.pad(entropy, ((0, 0), (1, 0)))


def adapters_off(params):
    """The params with every fine-tuning node replaced by the weight it wraps.

    Why: with a LoRA (DoRA, IA3, adapter) policy the reference model of PPO, DPO and GRPO is the
    same base with the adapters switched off, so one copy of the base weights serves both (under
    jit this is a view of the same arrays, not a copy). Nested adapters unwrap fully.
    """
    def unwrap(x):
        while isinstance(x, ADAPTER_NODES):
            x = x.base
        return x

    return jax.tree.map(unwrap, params, is_leaf=lambda x: isinstance(x, ADAPTER_NODES))


def has_adapters(params) -> bool:
    """Whether `params` holds any fine-tuning node (so `adapters_off` is the reference)."""
    return any(nodes.nodes_of(params, t) for t in ADAPTER_NODES)

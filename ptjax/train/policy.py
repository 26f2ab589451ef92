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


def hidden(params, cfg, tokens, mask, rng=None):
    """Final hidden states [b, s, hidden] of one-sequence-per-row `tokens` (padding masked)."""
    mask = jnp.asarray(mask).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    return llama.hidden_states(params, cfg,
                               llama.embed_tokens(params, cfg, jnp.maximum(tokens, 0)),
                               positions, mask, rng=rng)


def shifted_logprobs(params, cfg, h, tokens, temperature: float):
    """(log-probs [b, s] aligned with `tokens`, 0 at t = 0; the logits [b, s-1, vocab] they
    came from) for hidden states `h` of `tokens`."""
    logits = llama.logits_from_hidden(params, cfg, h[:, :-1])
    logp = rl_math.logprobs_from_logits(logits, tokens[:, 1:], temperature)
    return jnp.pad(logp, ((0, 0), (1, 0))), logits


def token_logprobs(params, cfg, tokens, mask, *, temperature: float = 1.0, rng=None):
    """log p(tokens[:, t] | tokens[:, :t]) as float32 [b, s], aligned with `tokens` (0 at t = 0).

    Why aligned with the tokens rather than shifted: the response mask of a rollout or a
    preference pair then selects the log-probs directly. `temperature` must be the sampler's, so
    PPO's ratios compare the distribution that sampled.
    """
    h = hidden(params, cfg, tokens, mask, rng)
    return shifted_logprobs(params, cfg, h, tokens, temperature)[0]


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


def reference(params, frozen=None):
    """The reference policy's params: a given frozen copy, or (None) `params` with their
    adapters off, the same base arrays and no second copy."""
    return adapters_off(params) if frozen is None else frozen


def has_adapters(params) -> bool:
    """Whether `params` holds any fine-tuning node (so `adapters_off` is the reference)."""
    return any(nodes.nodes_of(params, t) for t in ADAPTER_NODES)

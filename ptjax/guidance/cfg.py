"""Classifier-free guidance for language models, and negative (contrastive) prompts.

Each sampled row runs as two streams in one batched forward and one KV cache: the conditional
prompt and the unconditional one (just BOS by default) or a negative prompt. Every step mixes
their next-token distributions in log-probability space,

    log p_cfg = log p_uncond + s * (log p_cond - log p_uncond),

(Sanchez et al. 2023, "Stay on topic with classifier-free guidance"), then filters and samples
as usual and appends the chosen token to both streams. s = 1 is plain conditional sampling,
s > 1 pushes away from what the unconditional (or negative) prompt would say. The sampler does
the stream bookkeeping (`sampling.generate(combine_streams=...)`); this module says how streams
combine and lays out the prompts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import sampling
from ptjax.data import encode_prompt


def combine_logits(logits, scale: float):
    """[b, vocab] guided log-probabilities from [2b, vocab] logits stacked conditional rows
    first, then unconditional: `uncond + scale * (cond - uncond)` on log-softmaxed rows.

    Why log-softmax first: the streams' logits carry arbitrary per-row offsets; the rule is
    stated on log-probabilities, and normalized inputs keep the result's scale meaningful.
    """
    cond, uncond = jnp.split(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), 2)
    return uncond + scale * (cond - uncond)


def stack_streams(cond: list[np.ndarray], uncond: list[np.ndarray], pad_id: int):
    """(tokens [2b, p], mask [2b, p]) with the conditional prompts' rows first and the
    unconditional (or negative) ones after, all left-padded to one length (the longest, rounded
    up to `sampling.PAD_MULTIPLE` so prompt lengths share compiles)."""
    if len(cond) != len(uncond):
        raise ValueError(f"{len(cond)} conditional prompts but {len(uncond)} unconditional ones")
    longest = max(len(seq) for seq in cond + uncond)
    length = -(-longest // sampling.PAD_MULTIPLE) * sampling.PAD_MULTIPLE
    return sampling.left_pad(list(cond) + list(uncond), length, pad_id)


def generate(params, cfg, tokens, mask, rng, *, scale: float, max_new_tokens: int, **kwargs):
    """`sampling.generate` with classifier-free guidance: `tokens`/`mask` [2b, p] hold the
    conditional rows then the unconditional (or negative) ones (`stack_streams`); returns the
    sampler's dict for the b guided rows. `scale` may be traced; other keyword arguments are
    the sampler's."""
    return sampling.generate(params, cfg, tokens, mask, rng, max_new_tokens=max_new_tokens,
                             combine_streams=functools.partial(combine_logits, scale=scale),
                             **kwargs)


@functools.lru_cache(maxsize=16)
def make_generate_fn(cfg, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, eos_id=2, pad_id: int = 0):
    """A jitted `fn(params, tokens [2b, p], mask, rng, scale)` for `generate`, memoized per
    settings. The scale is a traced argument, so every scale shares one compiled sampler
    (`eos_id` must be hashable: an int or a tuple)."""
    def fn(params, tokens, mask, rng, scale):
        return generate(params, cfg, tokens, mask, rng, scale=scale,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, pad_id=pad_id)

    return jax.jit(fn)


def generate_text(params, cfg, tokenizer, prompts: list[str], *, scale: float,
                  negative_prompts: list[str] | None = None, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0) -> list[str]:
    """Completions of `prompts` under guidance scale `scale`, strings in and out.

    The unconditional stream of each prompt is BOS alone, or its negative prompt (the text it
    should move away from) when `negative_prompts` is given. All prompts run as one batch.
    """
    cond = [encode_prompt(text, tokenizer) for text in prompts]
    negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    uncond = [encode_prompt(text, tokenizer) for text in negatives]
    tokens, mask = stack_streams(cond, uncond, tokenizer.pad_id)
    stop_ids = sampling.tokenizer_stop_ids(tokenizer)
    fn = make_generate_fn(cfg, int(max_new_tokens), float(temperature), int(top_k),
                          float(top_p), stop_ids, int(tokenizer.pad_id))
    out = np.asarray(fn(params, tokens, mask, jax.random.key(seed), jnp.float32(scale))["tokens"])
    return [sampling.text_of(row, stop_ids, tokenizer) for row in out]

"""Autoregressive sampling over the KV cache: greedy, temperature, top-k, top-p, with logprobs.

Prompts arrive left-padded, so every row's last prompt token sits in the same cache slot and one
`decode` call prefills the whole batch. Each new token is then one more single-token `decode`
inside a `lax.while_loop` that stops as soon as every row has emitted EOS. All shapes are static,
so a batch shape compiles once and RL rollouts, evaluation and demos share the same program.

The logprob returned for each token is taken under `log_softmax(logits / temperature)` *before*
top-k/top-p filtering: that is the policy PPO and GRPO score with a plain forward pass, so the
rollout's logprobs and the trainer's agree (greedy decoding reports temperature-1 logprobs). A
repetition penalty other than 1 changes the distribution sampled from, and the logprobs are
taken under the penalized logits.

Soft prompts and prefixes enter through `prompts.model_inputs`, the function the train step
uses, so a prompt-tuned or prefix-tuned model samples exactly as it was trained (and as PEFT
runs it: prefix positions start at P).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from ptjax import ops
from ptjax import tree as ptree
from ptjax.data import encode_prompt
from ptjax.kernels import cpu as kernels_cpu
from ptjax.models import llama
from ptjax.models.config import ModelConfig
from ptjax.nodes import WeightNode
from ptjax.peft import prompts
from ptjax.quant import fused

PAD_MULTIPLE = 16  # generate_text pads prompt lengths to a multiple of this to reuse compiles


def positions_from_mask(mask):
    """RoPE positions [b, s] that count real tokens only, so left padding does not shift them.

    A left-padded prompt then sees the same positions as the unpadded one; padding slots get 0
    (they are never attended to, so their value does not matter).
    """
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def filter_logits(logits, top_k: int, top_p: float):
    """Logits with everything outside the top-k set and then the top-p nucleus masked out.

    Truncating the tail keeps sampling from wandering into the many low-probability tokens whose
    total mass is large. `top_k` keeps the k largest logits (0 or >= vocab: off; tied values at
    the k-th logit are all kept). `top_p` then keeps the smallest set of the most probable tokens
    whose probability (under the top-k-renormalized softmax) reaches `top_p`; the most probable
    token is always kept, and `top_p >= 1` is off. Masked entries become the dtype's most negative
    finite value, so softmax and categorical sampling give them zero probability without NaNs.
    Both arguments are Python numbers (static under jit).
    """
    neg = jnp.finfo(logits.dtype).min
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, neg)
    if top_p < 1.0:
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p).at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, neg)
    return logits


def normalize_stop_ids(eos_id) -> tuple[int, ...]:
    """`eos_id` (one id or a sequence of ids) as a tuple of ints.

    Why: chat models end turns with more than one token (Llama 3's `<|eot_id|>` and
    `<|end_of_text|>`), and the tuple is hashable, so it can key the compile cache.
    """
    return tuple(int(i) for i in np.atleast_1d(np.asarray(eos_id)).tolist())


def tokenizer_stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a generation for `tokenizer`: its `stop_ids` when it has them, else
    `(tokenizer.eos_id,)`."""
    stop_ids = getattr(tokenizer, "stop_ids", None)
    return normalize_stop_ids(stop_ids if stop_ids else tokenizer.eos_id)


def penalize_repetition(logits, seen, penalty: float):
    """Logits with every already-seen token discouraged, as transformers'
    `RepetitionPenaltyLogitsProcessor` does: a positive logit is divided by `penalty`, a
    negative one multiplied (1.0 is off). `seen` [b, vocab] bool marks the ids in the prompt
    or generated so far.

    Why: small or lightly tuned models loop on a phrase under greedy decoding; the penalty is
    the standard, checkpoint-independent remedy and is applied before temperature.
    """
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def _seen_tokens(tokens, valid, vocab: int):
    """[b, vocab] bool: which ids occur among the `valid` entries of `tokens` [b, s]."""
    b = tokens.shape[0]
    counts = jnp.zeros((b, vocab), jnp.int32).at[
        jnp.arange(b)[:, None], jnp.clip(tokens, 0, vocab - 1)].add(valid.astype(jnp.int32))
    return counts > 0


def unpack_bitmask(bits, vocab: int):
    """[b, vocab] bool from a token bitmask [b, ceil(vocab/32)] int32 (bit j of word i is token
    32*i + j, least significant bit first).

    Why this format: constraint engines (llguidance) write their allowed-token sets this way,
    so a host callback hands the sampler 1/32 of the bytes a bool mask would take.
    """
    shifts = jnp.arange(32, dtype=jnp.uint32)
    words = jax.lax.bitcast_convert_type(bits.astype(jnp.int32), jnp.uint32)
    unpacked = (words[:, :, None] >> shifts) & 1
    return unpacked.reshape(bits.shape[0], -1)[:, :vocab].astype(bool)


def _choose(logits, key, temperature: float, top_k: int, top_p: float):
    """(token [b] int32, logprob [b] f32) for one step; greedy when temperature is 0.

    The greedy token is the first index holding the row maximum, found with two plain
    reductions (max, then min over matching indices): the same token as `argmax`, whose
    variadic (value, index) reduction over a 32,000-entry vocabulary cost XLA's CPU backend
    about 1 ms per decode step at batch 16. The log-prob reuses that maximum for the logsumexp
    instead of materializing a log-softmax over the vocabulary.
    """
    scaled = logits.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    top = jnp.max(scaled, axis=-1, keepdims=True)
    logsumexp = top[:, 0] + jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1))
    if temperature > 0:
        token = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
    else:
        vocab = jnp.arange(scaled.shape[-1], dtype=jnp.int32)
        token = jnp.min(jnp.where(scaled == top, vocab, scaled.shape[-1]), axis=-1)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - logsumexp


def inference_params(params, cfg: ModelConfig):
    """`params` as a decode loop reads them: P-tuning encoders and prefix MLPs run once
    (`prompts.finalize`), and matmul weights cast once to the compute dtype
    (`tree.cast_matmul_weights`), not in every step of the loop (float32 master weights in a
    bfloat16 decode step were a cast of every weight per token)."""
    return ptree.cast_matmul_weights(prompts.finalize(params), cfg.compute_dtype)


@flax.struct.dataclass
class OutInKernel(WeightNode):
    """A plain matmul weight stored transposed, [out, in], as a decode loop reads it fastest on
    CPU (see `decode_layout`); `x @ kernel` with both dot operands contracting their last dim."""

    kernel_t: Any  # [out, in]
    # multiplied by the fused CPU kernel (`kernels.cpu.bf16_matmul_nt`) in bf16 compute
    fused: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def shape(self):
        return self.kernel_t.shape[::-1]

    def linear(self, x, dtype, rng=None):
        if self.fused and jnp.dtype(dtype) == jnp.bfloat16:
            x2 = x.reshape(-1, x.shape[-1])
            y = kernels_cpu.bf16_matmul_nt(x2, self.kernel_t).astype(dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return ops.dense_t(x, self.kernel_t, dtype)

    def materialize(self):
        return self.kernel_t.T

    def part_axes(self, axes):
        return {"kernel_t": tuple(axes)[::-1]}


DECODE_LAYOUT_MAX_ROWS = 64
DECODE_LAYOUT_MAX_BYTES = 2**30


def decode_layout(params, batch: int):
    """`params` with every plain 2-D matmul kernel (those inside adapter nodes too) stored
    [out, in] as `OutInKernel`s, and bf16 kernels and NF4/int8 nodes multiplied by the fused
    CPU kernels (`ptjax.kernels.cpu`, `quant.fused`) where they run, for the decode loop on CPU;
    unchanged elsewhere.

    Why: a decode step multiplies `batch` rows by every weight, and XLA's CPU dot library
    runs such few-row products faster when the weight's rows are the output features
    (measured on a 2-core Zen 4, bf16, 16 rows: 0.14 against 0.15-0.18 ms for a [512, 1408]
    kernel, 3.2 against 3.6 ms for a [512, 32000] head; llama-56m decodes about 13% faster).
    With hundreds of rows it is slower (256 rows: 32 against 23 ms for that head), so the
    prefill keeps the stored layout, and so does a batch above `DECODE_LAYOUT_MAX_ROWS`. The
    transposes run once per `generate` call, before the loop (a real copy: XLA would fold a
    plain transpose back into each dot), and the copy holds the weights a second time while
    the loop runs, so weights over `DECODE_LAYOUT_MAX_BYTES` (a ~500M-parameter model in
    bf16) keep their layout: there memory matters more. GPUs and TPUs take either layout at
    full speed, so there nothing changes.
    """
    if jax.default_backend() != "cpu" or batch > DECODE_LAYOUT_MAX_ROWS:
        return params
    matmul = ptree.select(params, ptree.MATMUL_WEIGHTS)

    def transposable(w, is_matmul):
        return bool(is_matmul and w.ndim == 2 and jnp.issubdtype(w.dtype, jnp.floating))

    chosen = jax.tree.map(transposable, params, matmul)
    size = sum(w.size * w.dtype.itemsize for w, c in zip(jax.tree.leaves(params),
                                                          jax.tree.leaves(chosen)) if c)
    def laid_out(w):
        # The fused kernel reads bf16 rows of a multiple of 32 values; others keep XLA's dot.
        return OutInKernel(ops.real_transpose(w),
                           fused=w.dtype == jnp.bfloat16 and w.shape[0] % 32 == 0
                           and kernels_cpu.available())

    if size <= DECODE_LAYOUT_MAX_BYTES:
        params = jax.tree.map(lambda w, c: laid_out(w) if c else w, params, chosen)
    return fused.for_decode(params)


def generate(params, cfg: ModelConfig, prompt_tokens, prompt_mask, rng, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id=2,
             pad_id: int = 0, repetition_penalty: float = 1.0, prompt_embeds=None,
             on_token=None, combine_streams=None, allowed_tokens=None) -> dict:
    """Continue left-padded prompts by up to `max_new_tokens` tokens with a KV cache.

    Why this shape: RL and evaluation need whole batches of continuations, their logprobs and
    where each one stopped, from one compiled program. `prompt_tokens` [b, p] int32 and
    `prompt_mask` [b, p] (1 = real token) are left-padded; negative ids are virtual-token slots
    of a soft prompt in `params`, and a prefix in `params` fills the first cache entries (both
    via `prompts.model_inputs`). `prompt_embeds` [b, p, hidden], if given, replaces the prompt's
    input embeddings. Hyperparameters are static; temperature 0 is greedy argmax and ignores
    top-k/top-p; `repetition_penalty` (1.0 = off) discourages ids already in the prompt or
    output, before temperature (see `penalize_repetition`).

    `eos_id` is one id or a sequence of ids: a row stops after emitting any of them, then emits
    `pad_id` with logprob 0. `on_token`, a host function `(tokens [b] int32, active [b] bool)
    -> [b] bool` called once per step in order, sees each step's tokens as they are made
    (streaming) and may stop rows (True: the row is done after this token; stop strings). Returns `tokens` [b, n] int32, `logprobs` [b, n] f32 (see the
    module docstring), `lengths` [b] int32 (tokens emitted, EOS included) and `done` [b] bool
    (EOS was emitted).

    Two hooks serve inference-time guidance (`ptjax.guidance`). `combine_streams` runs several
    model rows per sampled row in the one cache: `prompt_tokens` then holds k*b rows, stream by
    stream (classifier-free guidance: the conditional prompts, then the unconditional or
    negative ones), the function maps their logits [k*b, vocab] to the b rows sampled from, and
    each chosen token is appended to all k streams; the repetition penalty, filters and logprobs
    then apply to the combined logits, and `seen` comes from the first stream. `allowed_tokens`,
    a host function `(last tokens [b] int32, -1 before the first; active [b] bool) -> bitmask
    [b, ceil(vocab/32)] int32` (see `unpack_bitmask`) called once per step before choosing,
    restricts that step to the set bits (constrained decoding: masked logits become -inf, and
    the logprobs are those of the masked distribution); it must leave at least one token of
    every active row.
    """
    rows, p = prompt_tokens.shape
    stop_ids = jnp.asarray(normalize_stop_ids(eos_id), jnp.int32)
    penalize = repetition_penalty != 1.0
    mask = prompt_mask.astype(jnp.int32)
    params = inference_params(params, cfg)
    inputs_embeds, positions, prefix = prompts.model_inputs(params, cfg, prompt_tokens,
                                                            positions_from_mask(mask))
    if prompt_embeds is not None:
        inputs_embeds = prompt_embeds
    cache = llama.init_cache(cfg, rows, p + max_new_tokens, prefix=prefix)
    hidden, cache = llama.decode(params, cfg, inputs_embeds, positions, mask, cache)
    # Position of generated token 0: after the prefix (if any) and the row's real tokens.
    next_position = prompts.prefix_length(params) + jnp.sum(mask, axis=-1).astype(jnp.int32)
    first_logits = llama.logits_from_hidden(params, cfg, hidden[:, -1])
    params = decode_layout(params, rows)
    b = rows
    if combine_streams is not None:
        b = jax.eval_shape(combine_streams, first_logits).shape[0]
    streams = rows // b
    if streams * b != rows:
        raise ValueError(f"combine_streams gave {b} rows for {rows} prompt rows; "
                         "expected a divisor")

    def not_finished(state):
        return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

    def step_fn(state):
        """Emit one token per row from the carried logits, then run it through the model.

        Sampling sits in one place of the loop body (instead of once before the loop and once
        inside), which keeps the compiled program small; the price is one decode after the last
        token whose logits go unused.
        """
        step = state["step"]
        logits = state["logits"]
        if combine_streams is not None:
            logits = combine_streams(logits)
        if penalize:
            logits = penalize_repetition(logits, state["seen"], repetition_penalty)
        active = ~state["done"]
        if allowed_tokens is not None:
            previous = jax.lax.dynamic_slice_in_dim(state["tokens"], jnp.maximum(step - 1, 0),
                                                    1, 1)
            last = jnp.where(step > 0, previous[:, 0], -1)
            words = -(-logits.shape[-1] // 32)
            bits = io_callback(
                lambda t, a: np.asarray(allowed_tokens(t, a), np.int32).reshape(b, words),
                jax.ShapeDtypeStruct((b, words), jnp.int32), last, active, ordered=True)
            logits = jnp.where(unpack_bitmask(bits, logits.shape[-1]), logits, -jnp.inf)
        token, logprob = _choose(logits, jax.random.fold_in(rng, step), temperature, top_k, top_p)
        token = jnp.where(active, token, pad_id).astype(jnp.int32)
        stop = jnp.isin(token, stop_ids)
        if on_token is not None:
            stop |= io_callback(lambda t, a: np.asarray(on_token(t, a), bool).reshape(b),
                                jax.ShapeDtypeStruct((b,), jnp.bool_), token, active,
                                ordered=True)
        logprob = jnp.where(active, logprob, 0.0)
        positions = (next_position + step)[:, None]
        fed = jnp.tile(token, streams)  # the same token appended to every stream
        hidden, cache = llama.decode(params, cfg, llama.embed_tokens(params, cfg, fed[:, None]),
                                     positions, jnp.ones((rows, 1), jnp.int32), state["cache"])
        new_state = {
            "step": step + 1,
            "logits": llama.logits_from_hidden(params, cfg, hidden[:, -1]),
            "cache": cache,
            "tokens": jax.lax.dynamic_update_slice(state["tokens"], token[:, None], (0, step)),
            "logprobs": jax.lax.dynamic_update_slice(state["logprobs"], logprob[:, None], (0, step)),
            "lengths": state["lengths"] + active.astype(jnp.int32),
            "done": state["done"] | (active & stop),
        }
        if penalize:
            new_state["seen"] = state["seen"].at[jnp.arange(b), token].max(active)
        return new_state

    state = {
        "step": jnp.zeros((), jnp.int32),
        "logits": first_logits,
        "cache": cache,
        "tokens": jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        "logprobs": jnp.zeros((b, max_new_tokens), jnp.float32),
        "lengths": jnp.zeros((b,), jnp.int32),
        "done": jnp.zeros((b,), bool),
    }
    if penalize:  # virtual-token slots (negative ids) and padding are not vocabulary ids
        first = prompt_tokens[:b]  # the first stream's prompts
        state["seen"] = _seen_tokens(first, (mask[:b] > 0) & (first >= 0), cfg.vocab_size)
    state = jax.lax.while_loop(not_finished, step_fn, state)
    return {k: state[k] for k in ("tokens", "logprobs", "lengths", "done")}


def make_generate_fn(cfg: ModelConfig, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, eos_id=2, pad_id: int = 0,
                     repetition_penalty: float = 1.0):
    """A jitted `fn(params, prompt_tokens, prompt_mask, rng) -> generate(...)'s dict`.

    Binding the static hyperparameters once, and memoizing per (cfg, hyperparameters), lets
    training loops and evaluation call the sampler repeatedly without retracing or recompiling;
    the values are normalized first so `temperature=1` and `temperature=1.0` (or `eos_id=2` and
    `eos_id=[2]`) share one program. `eos_id` is one id or a sequence of stop ids.
    """
    return _jitted_generate(cfg, int(max_new_tokens), float(temperature), int(top_k),
                            float(top_p), normalize_stop_ids(eos_id), int(pad_id),
                            float(repetition_penalty))


@functools.lru_cache(maxsize=32)
def _jitted_generate(cfg, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
                     repetition_penalty):
    """The memoized jitted sampler behind `make_generate_fn` (arguments already normalized)."""

    def fn(params, prompt_tokens, prompt_mask, rng):
        return generate(params, cfg, prompt_tokens, prompt_mask, rng,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, pad_id=pad_id,
                        repetition_penalty=repetition_penalty)

    return jax.jit(fn)


def left_pad(sequences: Sequence[np.ndarray], length: int, pad_id: int):
    """(tokens [n, length] int32, mask [n, length] bool) with each sequence right-aligned.

    Left padding puts every prompt's last token in the final slot, which is what lets the sampler
    prefill a ragged batch in one call and read every row's next-token logits from one column.
    """
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence of length {len(seq)} does not fit in {length}")
        if len(seq):
            tokens[row, -len(seq):] = seq
            mask[row, -len(seq):] = True
    return tokens, mask


def text_of(tokens: np.ndarray, stop_ids: tuple[int, ...], tokenizer) -> str:
    """Decoded text of one generated row, cut before its first stop id."""
    ids = tokens.tolist()
    stops = [i for i, t in enumerate(ids) if t in stop_ids]
    return tokenizer.decode(ids[:stops[0]] if stops else ids)


def generate_text(params, cfg: ModelConfig, tokenizer, prompts: list[str], *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  repetition_penalty: float = 1.0, seed: int = 0,
                  batch_size: int = 32) -> list[str]:
    """Completions of `prompts` as strings: the evaluation and demo path, strings in and out.

    Prompts are encoded as in training (`ptjax.data.encode_prompt`), batched `batch_size` at a
    time with the last batch filled by dummy rows, and left-padded to a multiple of 16 tokens, so
    an evaluation over many prompts compiles once per length bucket. Batch j samples with
    `fold_in(key(seed), j)`; greedy output does not depend on batching. Generation stops at any
    of the tokenizer's stop ids (`stop_ids`, else its `eos_id`).
    """
    encoded = [encode_prompt(text, tokenizer) for text in prompts]
    return generate_from_ids(params, cfg, tokenizer, encoded, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed,
                             batch_size=batch_size)


def generate_from_ids(params, cfg: ModelConfig, tokenizer, encoded: list[np.ndarray], *,
                      max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                      batch_size: int = 32) -> list[str]:
    """`generate_text` for prompts already encoded (e.g. with virtual-token slots)."""
    stop_ids = tokenizer_stop_ids(tokenizer)
    fn = make_generate_fn(cfg, max_new_tokens, temperature, top_k, top_p, stop_ids,
                          tokenizer.pad_id, repetition_penalty)
    key = jax.random.key(seed)
    outputs: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        rows = batch + [np.asarray([tokenizer.bos_id], np.int32)] * (batch_size - len(batch))
        longest = max(len(seq) for seq in rows)
        length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
        tokens, mask = left_pad(rows, length, tokenizer.pad_id)
        result = fn(params, tokens, mask, jax.random.fold_in(key, start // batch_size))
        generated = np.asarray(result["tokens"])
        outputs += [text_of(generated[i], stop_ids, tokenizer) for i in range(len(batch))]
    return outputs

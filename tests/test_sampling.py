import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from random_params import spread_params
from ptjax import sampling
from ptjax.data import ByteTokenizer
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.peft import prompts

CFG = preset("tiny")
N_NEW = 8


PARAMS = spread_params(CFG)
_forward = jax.jit(llama.forward, static_argnums=1)
WIDTH, ROWS = 48, 8  # every reference forward is [ROWS, WIDTH]: one compile for the whole file


def _logits(seqs):
    """Uncached logits [len(seq), vocab] of each sequence, computed without any left padding.

    Sequences are right-padded into one fixed shape (segment 0 past their end); under causal
    attention a position never sees the slots after it, so each row is its own unpadded forward.
    """
    out = []
    for start in range(0, len(seqs), ROWS):
        chunk = seqs[start:start + ROWS]
        tokens = np.zeros((ROWS, WIDTH), np.int32)
        segments = np.zeros((ROWS, WIDTH), np.int32)
        for row, seq in enumerate(chunk):
            tokens[row, :len(seq)] = seq
            segments[row, :len(seq)] = 1
        positions = np.broadcast_to(np.arange(WIDTH, dtype=np.int32), (ROWS, WIDTH))
        logits = np.asarray(_forward(PARAMS, CFG, tokens, positions, segments))
        out += [logits[row, :len(seq)] for row, seq in enumerate(chunk)]
    return out


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _reference(prompts, n_new, eos_id=2):
    """Greedy (tokens, temperature-1 logprobs) per prompt, one uncached forward per step."""
    seqs = [list(p) for p in prompts]
    results = [([], []) for _ in prompts]
    for _ in range(n_new):
        live = [i for i, (tokens, _) in enumerate(results) if eos_id not in tokens]
        for i, logits in zip(live, _logits([seqs[i] for i in live])):
            token = int(np.argmax(logits[-1]))
            results[i][0].append(token)
            results[i][1].append(float(_log_softmax(logits[-1])[token]))
            seqs[i].append(token)
    return results


def _prompts(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, CFG.vocab_size, n - 1)]).astype(np.int32)
            for n in lengths]


LENGTHS = (3, 9, 6, 1)
PROMPTS = _prompts(LENGTHS)
TOKENS, MASK = sampling.left_pad(PROMPTS, 16, 0)
REFERENCE = _reference(PROMPTS, N_NEW)


def test_positions_count_real_tokens_only():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(sampling.positions_from_mask(mask),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])


def test_greedy_matches_uncached_reference_with_ragged_left_padding():
    out = sampling.make_generate_fn(CFG, N_NEW)(PARAMS, TOKENS, MASK, jax.random.key(0))
    b = len(PROMPTS)
    chex.assert_shape([out["tokens"], out["logprobs"]], (b, N_NEW))
    chex.assert_shape([out["lengths"], out["done"]], (b,))
    chex.assert_type([out["tokens"], out["logprobs"], out["lengths"], out["done"]],
                     [jnp.int32, jnp.float32, jnp.int32, bool])
    for row, (tokens, logprobs) in enumerate(REFERENCE):
        assert 2 not in tokens  # EOS is covered below; here every row runs to the end
        np.testing.assert_array_equal(out["tokens"][row], tokens, err_msg=f"row {row}")
        np.testing.assert_allclose(out["logprobs"][row], logprobs, atol=1e-4, err_msg=f"row {row}")
    np.testing.assert_array_equal(out["lengths"], N_NEW)
    assert not out["done"].any()
    # The rows genuinely differ, so a batching mix-up could not pass unnoticed.
    assert len({tuple(t) for t, _ in REFERENCE}) == len(REFERENCE)


def test_attention_over_the_filled_cache_blocks_matches_the_reference():
    """30 new tokens after 16 prompt slots: a 46-slot cache of two blocks (32, 46), so the
    decode steps move from attending over the first block to the whole cache mid-way."""
    n_new = 30
    assert llama.cache_blocks(16 + n_new) == [32, 46]
    out = sampling.make_generate_fn(CFG, n_new, eos_id=-1)(PARAMS, TOKENS, MASK,
                                                           jax.random.key(0))
    for row, (tokens, logprobs) in enumerate(_reference(PROMPTS, n_new, eos_id=-1)):
        np.testing.assert_array_equal(out["tokens"][row], tokens, err_msg=f"row {row}")
        np.testing.assert_allclose(out["logprobs"][row], logprobs, atol=1e-4, err_msg=f"row {row}")


@pytest.mark.parametrize("slots, blocks", [(24, [24]), (32, [32]), (46, [32, 46]),
                                           (192, [32, 64, 96, 128, 160, 192]),
                                           (1000, [125 * (j + 1) for j in range(8)])])
def test_cache_blocks_end_at_the_whole_cache(slots, blocks):
    assert llama.cache_blocks(slots) == blocks


def test_decode_layout_transposes_plain_kernels_only():
    """Kernels (also a LoRA's base) become [out, in] `OutInKernel`s whose matmul and
    materialization equal the original's; vectors, embeddings and the adapter factors stay."""
    from ptjax import ops
    from ptjax.peft import lora

    params = lora.inject(PARAMS, jax.random.key(1), rank=2, alpha=4.0,
                         targets=r"attn/q/kernel$")
    laid_out = sampling.decode_layout(params, batch=4)
    q = laid_out["layers_0"]["attn"]["q"]["kernel"]
    assert isinstance(q.base, sampling.OutInKernel) and q.a.ndim == 2
    k = laid_out["layers_0"]["attn"]["k"]["kernel"]
    assert isinstance(k, sampling.OutInKernel)
    np.testing.assert_array_equal(k.kernel_t,
                                  np.asarray(PARAMS["layers_0"]["attn"]["k"]["kernel"]).T)
    assert laid_out["embed"]["embedding"] is params["embed"]["embedding"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, CFG.hidden)), jnp.float32)
    for name in ("q", "k"):
        want = ops.linear(x, params["layers_0"]["attn"][name]["kernel"], jnp.float32)
        got = ops.linear(x, laid_out["layers_0"]["attn"][name]["kernel"], jnp.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(
            ops.materialize(laid_out["layers_0"]["attn"][name]["kernel"]),
            ops.materialize(params["layers_0"]["attn"][name]["kernel"]))
    # a batch of hundreds of rows keeps the stored layout (slower transposed, see decode_layout)
    assert sampling.decode_layout(params, batch=sampling.DECODE_LAYOUT_MAX_ROWS + 1) is params


def test_decode_layout_keeps_large_weights_as_they_are(monkeypatch):
    """The transposed copy holds the weights twice: past the byte limit they stay as stored."""
    kernels = sum(x.nbytes for x in jax.tree.leaves(PARAMS) if x.ndim == 2) - \
        PARAMS["embed"]["embedding"].nbytes
    monkeypatch.setattr(sampling, "DECODE_LAYOUT_MAX_BYTES", kernels)
    assert sampling.decode_layout(PARAMS, batch=4) is not PARAMS
    monkeypatch.setattr(sampling, "DECODE_LAYOUT_MAX_BYTES", kernels - 1)
    assert sampling.decode_layout(PARAMS, batch=4) is PARAMS


EOS = REFERENCE[0][0][3]  # the token row 0 emits greedily at step 3, used as EOS below


def test_eos_stops_rows_and_pads_the_rest():
    # Row 0 must stop at step 3 (or earlier); every other row wherever EOS first appears in its
    # reference, if at all.
    out = sampling.make_generate_fn(CFG, N_NEW, eos_id=EOS)(PARAMS, TOKENS, MASK, jax.random.key(0))
    for row, (tokens, logprobs) in enumerate(REFERENCE):
        stop = tokens.index(EOS) + 1 if EOS in tokens else N_NEW
        expected = tokens[:stop] + [0] * (N_NEW - stop)
        np.testing.assert_array_equal(out["tokens"][row], expected, err_msg=f"row {row}")
        np.testing.assert_allclose(out["logprobs"][row], logprobs[:stop] + [0.0] * (N_NEW - stop),
                                   atol=1e-4)
        assert int(out["lengths"][row]) == stop
        assert bool(out["done"][row]) == (EOS in tokens)
    assert int(out["lengths"][0]) <= 4 and bool(out["done"][0])
    assert not out["done"].all()


def test_rows_that_all_finish_together():
    # Four copies of row 0 all emit EOS at once, so the loop stops early: the slots it never
    # reached must still read as padding with logprob 0.
    tokens, mask = sampling.left_pad([PROMPTS[0]] * 4, 16, 0)
    out = sampling.make_generate_fn(CFG, N_NEW, eos_id=EOS)(PARAMS, tokens, mask, jax.random.key(0))
    ref_tokens, ref_logprobs = REFERENCE[0]
    stop = ref_tokens.index(EOS) + 1
    np.testing.assert_array_equal(out["tokens"], [ref_tokens[:stop] + [0] * (N_NEW - stop)] * 4)
    np.testing.assert_allclose(out["logprobs"][:, :stop], [ref_logprobs[:stop]] * 4, atol=1e-4)
    np.testing.assert_array_equal(out["logprobs"][:, stop:], 0.0)
    np.testing.assert_array_equal(out["lengths"], stop)
    assert out["done"].all()


def _numpy_filter(logits, top_k, top_p):
    """Reference top-k then top-p keep-mask for one row, written as plainly as possible."""
    order = np.argsort(-logits)
    keep = np.zeros(len(logits), bool)
    candidates = order[:top_k] if 0 < top_k < len(logits) else order
    values = logits[candidates]
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    total = 0.0
    for token, prob in zip(candidates, probs):  # candidates are sorted by descending logit
        keep[token] = True
        total += prob
        if top_p < 1.0 and total >= top_p:
            break
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (40, 1.0), (0, 0.3),
                                         (0, 0.9), (10, 0.5), (3, 0.99), (0, 0.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(top_k * 100 + int(top_p * 10)).normal(size=(16, 50)) * 2.0
    logits = logits.astype(np.float32)
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
    chex.assert_shape(out, logits.shape)
    for row in range(len(logits)):
        keep = _numpy_filter(logits[row].astype(np.float64), top_k, top_p)
        np.testing.assert_array_equal(out[row] > -1e30, keep, err_msg=f"row {row}")
        np.testing.assert_array_equal(out[row][keep], logits[row][keep])
    if top_k == 0 and top_p == 1.0:
        np.testing.assert_array_equal(out, logits)


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(np.sum((counts - expected) ** 2 / np.maximum(expected, 1e-12)))


def test_sampling_distribution_filters_and_logprobs():
    # One configuration exercises temperature, top-k and top-p together (one compile); the filters
    # alone are checked against numpy above.
    temperature, top_k, top_p = 1.5, 40, 0.8  # both filters bind: 30 tokens survive
    n, n_new, checked = 4096, 3, 16
    prompt = PROMPTS[1]
    tokens = jnp.asarray(np.tile(prompt, (n, 1)))
    fn = sampling.make_generate_fn(CFG, n_new, temperature, top_k, top_p, -1, 0)
    out = fn(PARAMS, tokens, jnp.ones_like(tokens), jax.random.key(7))
    generated = np.asarray(out["tokens"])

    # First token: the empirical distribution matches softmax(filter(logits / T)).
    logits = _logits([prompt])[0][-1].astype(np.float64)

    def filtered_probs(scaled):
        probs = np.where(_numpy_filter(scaled, top_k, top_p), np.exp(_log_softmax(scaled)), 0.0)
        return probs / probs.sum()

    probs = filtered_probs(logits / temperature)
    counts = np.bincount(generated[:, 0], minlength=CFG.vocab_size)
    support = probs > 0
    assert counts[~support].sum() == 0
    df = support.sum() - 1
    assert 5 <= df < top_k - 1, df  # several likely tokens, and top-p cut inside the top-k set
    bound = df + 6 * np.sqrt(2 * df)
    assert _chi_square(counts[support], probs[support]) < bound
    # ... while the same samples reject the distribution sampled without the temperature.
    assert _chi_square(counts, np.maximum(filtered_probs(logits), 1e-9)) > bound

    # Every later token too lies in the filtered set of its own (uncached) logits, and the
    # reported logprob is the unfiltered log_softmax(logits / T) of that token.
    rows = [list(prompt) + list(generated[i]) for i in range(checked)]
    for i, row_logits in enumerate(_logits(rows)):
        for step, token in enumerate(generated[i]):
            step_logits = row_logits[len(prompt) - 1 + step].astype(np.float64) / temperature
            assert _numpy_filter(step_logits, top_k, top_p)[token], (i, step)
            np.testing.assert_allclose(out["logprobs"][i, step], _log_softmax(step_logits)[token],
                                       atol=1e-4)
    assert len({tuple(r) for r in generated[:checked]}) > 1  # it really samples


def test_prompt_embeds_replace_token_embeddings():
    # Embeddings of the rows in reverse order, fed with the original tokens: the output must be
    # that of the reversed prompts, i.e. the embeddings, not the tokens, drive the prefill.
    embeds = llama.embed_tokens(PARAMS, CFG, TOKENS[::-1])
    generate = jax.jit(sampling.generate, static_argnums=1,
                       static_argnames=("max_new_tokens", "eos_id"))
    out = generate(PARAMS, CFG, TOKENS, MASK[::-1], jax.random.key(0), max_new_tokens=3,
                   eos_id=-1, prompt_embeds=embeds)
    np.testing.assert_array_equal(out["tokens"], [t[:3] for t, _ in REFERENCE[::-1]])


def test_generate_text_is_independent_of_batching():
    tok = ByteTokenizer()
    # Batches of 4: the first is padded to 32 tokens (the long prompt), the second to 16 and
    # filled with dummy rows; alone, each short prompt is padded to 16.
    prompts = ["hi", "the quick brown fox jumps over", "a", "hello world", "xyz"]
    kwargs = dict(max_new_tokens=N_NEW, batch_size=4)
    batched = sampling.generate_text(PARAMS, CFG, tok, prompts, **kwargs)
    assert isinstance(batched, list) and len(batched) == len(prompts)
    assert all(isinstance(text, str) for text in batched)
    alone = [sampling.generate_text(PARAMS, CFG, tok, [p], **kwargs)[0] for p in prompts]
    assert batched == alone
    # Both equal the uncached greedy reference, decoded up to (not including) EOS.
    reference = _reference([[1] + tok.encode(p) for p in prompts], N_NEW)
    for text, (tokens, _) in zip(batched, reference):
        assert text == tok.decode(tokens[:tokens.index(2)] if 2 in tokens else tokens)
    assert len({text for text in batched}) > 1


def test_every_step_draws_an_independent_token():
    """With all-zero params every logit is 0, so each token must be uniform over the vocabulary
    and independent of the others: a sampler that reused a key across steps (or rows) would
    repeat tokens along a row (or down a column)."""
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    n, n_new, vocab = 4096, 4, CFG.vocab_size
    tokens = jnp.asarray(np.tile(PROMPTS[1], (n, 1)))
    fn = sampling.make_generate_fn(CFG, n_new, 1.0, 0, 1.0, -1, 0)
    out = np.asarray(fn(zeros, tokens, jnp.ones_like(tokens), jax.random.key(3))["tokens"])
    uniform = np.full(vocab, 1.0 / vocab)
    df = vocab - 1
    bound = df + 6 * np.sqrt(2 * df)
    for step in range(n_new):  # each step's marginal is uniform
        assert _chi_square(np.bincount(out[:, step], minlength=vocab), uniform) < bound, step
    for step in range(n_new - 1):  # consecutive steps are independent: the shift is uniform too
        shift = (out[:, step + 1] - out[:, step]) % vocab
        assert _chi_square(np.bincount(shift, minlength=vocab), uniform) < bound, step
        assert np.mean(out[:, step + 1] == out[:, step]) < 5.0 / vocab, step
    assert len({tuple(row) for row in out}) > 0.99 * n  # whole sequences differ across rows


def test_generate_text_sampling_follows_the_documented_batches_and_keys(monkeypatch):
    """Batch j of `batch_size` rows (dummy BOS rows filling the last) samples with
    fold_in(key(seed), j), prompts left-padded to a multiple of 16; defaults: no top-k/top-p."""
    tok = ByteTokenizer()
    prompts = ["ab", "hello", "xyz"]
    fn = sampling.make_generate_fn(CFG, 6, 1.0, 0, 1.0, tok.eos_id, tok.pad_id)
    shapes, original = [], sampling.make_generate_fn

    def recording(*args):
        inner = original(*args)
        return lambda params, tokens, mask, rng: shapes.append(tokens.shape) or inner(
            params, tokens, mask, rng)

    with monkeypatch.context() as m:
        m.setattr(sampling, "make_generate_fn", recording)
        got = sampling.generate_text(PARAMS, CFG, tok, prompts, max_new_tokens=6,
                                     temperature=1.0, seed=5, batch_size=2)
    assert shapes == [(2, 16), (2, 16)]  # every call is one full batch of batch_size rows
    want = []
    for j, batch in enumerate([prompts[:2], prompts[2:] + [None]]):
        rows = [np.asarray([tok.bos_id] + (tok.encode(p) if p else []), np.int32) for p in batch]
        tokens, mask = sampling.left_pad(rows, 16, tok.pad_id)
        out = np.asarray(fn(PARAMS, tokens, mask, jax.random.fold_in(jax.random.key(5), j))["tokens"])
        for row, p in zip(out.tolist(), batch):
            if p is not None:
                want.append(tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row))
    assert got == want
    greedy = sampling.generate_text(PARAMS, CFG, tok, prompts, max_new_tokens=6, batch_size=2)
    assert got != greedy  # it sampled


def test_sampling_entry_points_take_options_by_keyword_only():
    tok = ByteTokenizer()
    with pytest.raises(TypeError):
        sampling.generate_text(PARAMS, CFG, tok, ["a"], 4)
    with pytest.raises(TypeError):
        sampling.generate(PARAMS, CFG, TOKENS, MASK, jax.random.key(0), 4)


def test_left_pad_fits_exactly_and_refuses_longer():
    tokens, mask = sampling.left_pad([np.arange(1, 5), np.arange(1, 3)], 4, 0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 4], [0, 0, 1, 2]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="length 5 does not fit in 4"):
        sampling.left_pad([np.arange(5)], 4, 0)


def test_filter_logits_on_leading_axes():
    logits = np.random.default_rng(9).normal(size=(3, 4, 50)).astype(np.float32) * 2.0
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), 10, 0.6))
    for i in range(3):
        for j in range(4):
            keep = _numpy_filter(logits[i, j].astype(np.float64), 10, 0.6)
            np.testing.assert_array_equal(out[i, j] > -1e30, keep, err_msg=f"{i},{j}")


# ----------------------------------------------------------------------------- stop ids


def test_any_of_several_eos_ids_stops_a_row():
    stops = (REFERENCE[0][0][3], REFERENCE[1][0][2])  # row 0's token at step 3, row 1's at 2
    assert stops[0] != stops[1]
    fn = sampling.make_generate_fn(CFG, N_NEW, eos_id=list(stops))
    assert fn is sampling.make_generate_fn(CFG, N_NEW, eos_id=stops)  # one program
    out = fn(PARAMS, TOKENS, MASK, jax.random.key(0))
    stopped_by = set()
    for row, (tokens, _) in enumerate(REFERENCE):
        hits = [i for i, t in enumerate(tokens) if t in stops]
        stop = hits[0] + 1 if hits else N_NEW
        stopped_by |= {tokens[hits[0]]} if hits else set()
        np.testing.assert_array_equal(out["tokens"][row], tokens[:stop] + [0] * (N_NEW - stop),
                                      err_msg=f"row {row}")
        assert int(out["lengths"][row]) == stop and bool(out["done"][row]) == bool(hits)
    assert stopped_by == set(stops)  # each id stopped some row


class StopTokenizer(ByteTokenizer):
    """Bytes with an extra stop id, as a chat tokenizer's end-of-turn token."""

    def __init__(self, extra):
        super().__init__()
        self.stop_ids = (self.eos_id, extra)


def test_generate_text_stops_at_the_tokenizer_stop_ids():
    plain = ByteTokenizer()
    prompts = ["hi", "hello world"]
    reference = _reference([[1] + plain.encode(p) for p in prompts], N_NEW)
    extra = reference[0][0][2]
    tok = StopTokenizer(extra)
    assert sampling.tokenizer_stop_ids(tok) == (tok.eos_id, extra)
    got = sampling.generate_text(PARAMS, CFG, tok, prompts, max_new_tokens=N_NEW, batch_size=2)
    for text, (tokens, _) in zip(got, reference):
        hits = [i for i, t in enumerate(tokens) if t in (tok.eos_id, extra)]
        assert text == tok.decode(tokens[:hits[0]] if hits else tokens)
    assert got[0] == tok.decode(reference[0][0][:2])
    # A tokenizer without `stop_ids` stops at its EOS.
    assert sampling.tokenizer_stop_ids(types.SimpleNamespace(eos_id=7)) == (7,)


# ----------------------------------------------------------------------------- repetition penalty


def test_penalize_repetition_matches_numpy():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(4, 50)) * 3).astype(np.float32)
    seen = rng.random((4, 50)) < 0.3
    got = np.asarray(sampling.penalize_repetition(jnp.asarray(logits), jnp.asarray(seen), 1.7))
    want = logits.copy()
    for r in range(4):
        for t in range(50):
            if seen[r, t]:
                want[r, t] = logits[r, t] / 1.7 if logits[r, t] > 0 else logits[r, t] * 1.7
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (got != logits).any() and (got[~seen] == logits[~seen]).all()


def _penalized_reference(prompts, n_new, penalty):
    """Greedy (tokens, logprobs) with transformers' repetition penalty over the prompt's and the
    generated ids, one uncached forward per step."""
    seqs = [list(p) for p in prompts]
    results = [([], []) for _ in prompts]
    for _ in range(n_new):
        for i, logits in enumerate(_logits(seqs)):
            step = logits[-1].astype(np.float64)
            for t in set(seqs[i]):
                step[t] = step[t] / penalty if step[t] > 0 else step[t] * penalty
            token = int(np.argmax(step))
            results[i][0].append(token)
            results[i][1].append(float(_log_softmax(step)[token]))
            seqs[i].append(token)
    return results


def test_repetition_penalty_greedy_matches_reference():
    penalty = 1.5
    reference = _penalized_reference(PROMPTS, N_NEW, penalty)
    # Pad with the id that the padded row 1 picks first: were padding counted as seen, that
    # row's first token would be penalized.
    pad = reference[1][0][0]
    assert pad not in PROMPTS[1] and len(PROMPTS[1]) < 16
    tokens, mask = sampling.left_pad(PROMPTS, 16, pad)
    fn = sampling.make_generate_fn(CFG, N_NEW, eos_id=-1, pad_id=pad, repetition_penalty=penalty)
    out = fn(PARAMS, tokens, mask, jax.random.key(0))
    for row, (want, logprobs) in enumerate(reference):
        np.testing.assert_array_equal(out["tokens"][row], want, err_msg=f"row {row}")
        np.testing.assert_allclose(out["logprobs"][row], logprobs, atol=1e-4)
    assert [t for t, _ in reference] != [t for t, _ in REFERENCE]  # the penalty acted


def test_repetition_penalty_breaks_a_copy_loop():
    """A crafted model that predicts its input token (no layers' effect, head = embeddings)
    repeats the prompt's last token forever; the penalty makes it move on."""
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1.0, (CFG.vocab_size, CFG.hidden)).astype(np.float32)
    params = jax.tree.map(jnp.zeros_like, PARAMS)
    params = {**params, "embed": {"embedding": jnp.asarray(table)},
              "lm_head": {"kernel": jnp.asarray(table.T)},
              "final_norm": {"scale": jnp.ones(CFG.hidden)}}
    prompt = np.asarray([[1, 40, 41, 42]], np.int32)
    mask = np.ones_like(prompt)
    plain = sampling.make_generate_fn(CFG, 6, eos_id=-1)(params, prompt, mask, jax.random.key(0))
    np.testing.assert_array_equal(plain["tokens"][0], [42] * 6)
    fn = sampling.make_generate_fn(CFG, 6, eos_id=-1, repetition_penalty=4.0)
    got = np.asarray(fn(params, prompt, mask, jax.random.key(0))["tokens"][0])
    assert len(set(got.tolist())) == 6 and not set(got.tolist()) & {1, 40, 41, 42}


# ----------------------------------------------------------------------------- soft prompts


def _with(part, seed):
    """PARAMS with a random 4-token soft prompt (`prompt`) or prefix (`prefix`)."""
    rng = np.random.default_rng(seed)
    width = CFG.hidden if part == "prompt" else prompts.prefix_width(CFG)
    return {**PARAMS, part: {"embeddings": jnp.asarray(rng.normal(0, 1.0, (4, width)),
                                                       jnp.float32)}}


@jax.jit
def _soft_forward(params, tokens, positions, segments):
    embeds, positions, prefix = prompts.model_inputs(params, CFG, tokens, positions)
    h = llama.hidden_states(params, CFG, embeds, positions, segments, prefix=prefix)
    return llama.logits_from_hidden(params, CFG, h)


def _soft_reference(params, seqs, n_new):
    """Greedy tokens per sequence, re-running the whole (uncached) soft-prompt forward each step
    on right-padded rows (causal attention never sees the padding after a token)."""
    seqs = [list(s) for s in seqs]
    for _ in range(n_new):
        tokens = np.zeros((len(seqs), WIDTH), np.int32)
        segments = np.zeros((len(seqs), WIDTH), np.int32)
        for row, seq in enumerate(seqs):
            tokens[row, :len(seq)], segments[row, :len(seq)] = seq, 1
        positions = np.broadcast_to(np.arange(WIDTH, dtype=np.int32), tokens.shape)
        logits = np.asarray(_soft_forward(params, tokens, positions, segments))
        for row, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[row, len(seq) - 1])))
    return [seq[-n_new:] for seq in seqs]


@pytest.mark.parametrize("part", ["prompt", "prefix"])
def test_soft_prompt_sampling_equals_full_reforward(part):
    params = _with(part, seed=4)
    seqs = PROMPTS if part == "prefix" else [np.concatenate([-np.arange(1, 5), p]) for p in PROMPTS]
    tokens, mask = sampling.left_pad(seqs, 16, 0)
    out = sampling.make_generate_fn(CFG, N_NEW, eos_id=-1)(params, tokens, mask,
                                                           jax.random.key(0))
    want = _soft_reference(params, seqs, N_NEW)
    np.testing.assert_array_equal(out["tokens"], want)
    assert want != [t for t, _ in REFERENCE]  # the soft prompt changes the continuation


def test_on_token_streams_each_step_and_can_stop_rows():
    """The host callback sees every step's tokens in order (what a streaming printer needs), and
    a row it flags is done after that token, as with EOS."""
    calls = []

    def on_token(tokens, active):
        calls.append((np.asarray(tokens).tolist(), np.asarray(active).tolist()))
        return np.asarray([len(calls) >= 3] + [False] * (len(tokens) - 1))  # stop row 0 at 3

    generate = jax.jit(sampling.generate, static_argnums=1,
                       static_argnames=("max_new_tokens", "eos_id", "on_token"))
    out = generate(PARAMS, CFG, TOKENS, MASK, jax.random.key(0), max_new_tokens=N_NEW, eos_id=-1,
                   on_token=on_token)
    jax.effects_barrier()
    assert len(calls) == N_NEW
    np.testing.assert_array_equal(np.asarray([c[0] for c in calls]).T, out["tokens"])
    assert [c[1][0] for c in calls] == [True] * 3 + [False] * (N_NEW - 3)
    np.testing.assert_array_equal(out["tokens"][0], REFERENCE[0][0][:3] + [0] * (N_NEW - 3))
    assert int(out["lengths"][0]) == 3 and bool(out["done"][0]) and not out["done"][1:].any()
    for row in range(1, len(PROMPTS)):
        np.testing.assert_array_equal(out["tokens"][row], REFERENCE[row][0])

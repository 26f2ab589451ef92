"""Inference-time guidance: soft prompts optimized against an objective, classifier-free
guidance and constrained decoding, on a tiny random model.

References: a plain uncached forward of token ids with float64 numpy log-softmax (the
objective, the guided log-probabilities), the unguided sampler itself (CFG at scale 1), Python's
`re` and `jsonschema` or a hand check (what constrained samples must satisfy), numpy's
`unpackbits` (masks).
"""

import dataclasses
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from random_params import spread_params
from ptjax import sampling
from ptjax.data import ByteTokenizer
from ptjax.guidance import cfg as guided
from ptjax.guidance import constraints, soft_prompt
from ptjax.models import llama
from ptjax.models.config import preset

CFG = dataclasses.replace(preset("tiny"), layers=1)  # one layer: half the compile time
TOK = ByteTokenizer()
ROWS, PROMPT_LEN, N_NEW = 8, 16, 12
ALLOWED = np.arange(CFG.vocab_size) >= TOK.OFFSET  # no PAD/BOS/EOS inside a prompt


PARAMS = spread_params(CFG)
_forward = jax.jit(llama.forward, static_argnums=1)
WIDTH = 40  # every reference forward is [ROWS, WIDTH]: one compile for the file


def _log_softmax64(seqs):
    """float64 log-softmax [len(seq), vocab] of each unpadded sequence's uncached logits."""
    tokens = np.zeros((ROWS, WIDTH), np.int32)
    segments = np.zeros((ROWS, WIDTH), np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, :len(seq)], segments[i, :len(seq)] = seq, 1
    logits = np.asarray(_forward(PARAMS, CFG, jnp.asarray(tokens), None, jnp.asarray(segments)),
                        np.float64)
    out = []
    for i, seq in enumerate(seqs):
        z = logits[i, :len(seq)]
        top = z.max(-1, keepdims=True)
        out.append(z - top - np.log(np.exp(z - top).sum(-1, keepdims=True)))
    return out


# ----------------------------------------------------------------------------- soft prompts

BATCH = soft_prompt.target_batch(TOK, ["ab", "cde", "f", "gh"], ["xyz", "xyz", "xyz", "xyz"])
OBJECTIVE = soft_prompt.target_log_likelihood(CFG)


def test_target_log_likelihood_matches_plain_forward_of_the_prompt_tokens():
    ids = np.array([40, 41, 42], np.int32)
    value = soft_prompt.evaluate(OBJECTIVE, PARAMS, soft_prompt.token_prompt(PARAMS, ids), BATCH)
    seqs = [np.concatenate([ids, row[m]]) for row, m in zip(BATCH["tokens"], BATCH["mask"])]
    total, count = 0.0, 0
    for seq, logp, target in zip(seqs, _log_softmax64(seqs), BATCH["target"]):
        for t in np.flatnonzero(target) + len(ids):
            total, count = total + logp[t - 1, seq[t]], count + 1
    np.testing.assert_allclose(value, total / count, rtol=0, atol=2e-5)


def test_soft_prompt_improves_objective_and_leaves_params_bitwise_unchanged():
    before_bytes = [np.asarray(x).tobytes() for x in jax.tree.leaves(PARAMS)]
    start = soft_prompt.init_prompt(PARAMS, CFG, jax.random.key(1), n=4)
    chex.assert_shape(start["prompt"]["embeddings"], (4, CFG.hidden))
    before = soft_prompt.evaluate(OBJECTIVE, PARAMS, start, BATCH)
    tuned, history = soft_prompt.optimize(OBJECTIVE, PARAMS, start, BATCH, steps=25,
                                          learning_rate=0.05)
    after = soft_prompt.evaluate(OBJECTIVE, PARAMS, tuned, BATCH)
    chex.assert_shape(history, (25,))
    np.testing.assert_allclose(history[0], before, atol=1e-5)  # step 0 scores the start
    assert after > before + 0.5, (before, after)
    assert [np.asarray(x).tobytes() for x in jax.tree.leaves(PARAMS)] == before_bytes
    assert not np.array_equal(tuned["prompt"]["embeddings"], start["prompt"]["embeddings"])


@pytest.mark.slow
def test_discrete_prompt_by_gumbel_softmax_and_nearest_token_projection():
    relaxed = soft_prompt.relax_discrete(OBJECTIVE, steps=60, allowed=ALLOWED)
    start = soft_prompt.init_discrete(CFG, jax.random.key(2), n=4)
    tuned, _ = soft_prompt.optimize(relaxed, PARAMS, start, BATCH, steps=60, learning_rate=0.3)
    first, ids = (soft_prompt.discrete_tokens(p, ALLOWED) for p in (start, tuned))
    assert (ids >= TOK.OFFSET).all()
    before, after = (soft_prompt.evaluate(OBJECTIVE, PARAMS, soft_prompt.token_prompt(PARAMS, i),
                                          BATCH) for i in (first, ids))
    assert after > before, (before, after)
    vectors = np.asarray(PARAMS["embed"]["embedding"])[[7, 100, 200]] * 3.0
    np.testing.assert_array_equal(soft_prompt.nearest_tokens(PARAMS, vectors), [7, 100, 200])
    np.testing.assert_array_equal(soft_prompt.nearest_tokens(PARAMS, vectors / 3.0, "l2"),
                                  [7, 100, 200])


@pytest.mark.slow
def test_candidate_and_sampled_reward_objectives_improve():
    batch = soft_prompt.target_batch(TOK, ["ab"] * 3 + ["cd"] * 3, ["x", "yy", "zzz"] * 2)
    batch["reward"] = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 0.0], np.float32)
    objective = soft_prompt.candidate_reward(CFG, 3)
    start = soft_prompt.init_prompt(PARAMS, CFG, jax.random.key(1), n=4)
    before = soft_prompt.evaluate(objective, PARAMS, start, batch)
    tuned, _ = soft_prompt.optimize(objective, PARAMS, start, batch, steps=30, learning_rate=0.05)
    assert soft_prompt.evaluate(objective, PARAMS, tuned, batch) > before + 0.1

    letter = TOK.encode("a")[0]
    sampled = soft_prompt.sampled_reward(
        CFG, lambda t, m, r: jnp.mean((t == letter) * r, axis=1), max_new_tokens=6)
    contexts = soft_prompt.context_batch(TOK, ["ab", "c", "hello", "x"] * 4)
    _, history = soft_prompt.optimize(sampled, PARAMS, start, contexts, steps=60,
                                      learning_rate=0.1)
    assert history[-10:].mean() > history[:10].mean()


# ----------------------------------------------------------------------------- CFG

PROMPTS = ["ab", "hello", "x", "the cat", "42", "q", "zz top", "abc"]
COND = [np.asarray([TOK.bos_id] + TOK.encode(p), np.int32) for p in PROMPTS]
UNCOND = [np.asarray([TOK.bos_id] + TOK.encode(p), np.int32)
          for p in ["", "", "", "", "no", "", "bad", ""]]  # two negative prompts
_plain = {t: sampling.make_generate_fn(CFG, N_NEW, t, eos_id=(TOK.eos_id,)) for t in (0.0, 1.0)}
_guided = {t: guided.make_generate_fn(CFG, N_NEW, t, eos_id=(TOK.eos_id,)) for t in (0.0, 1.0)}
# (memoized and jitted lazily: a test compiles only the samplers it runs)


def _run_plain(temperature, key):
    tokens, mask = sampling.left_pad(COND, PROMPT_LEN, TOK.pad_id)
    return jax.tree.map(np.asarray, _plain[temperature](PARAMS, tokens, mask, key))


def _run_guided(temperature, key, scale):
    tokens, mask = guided.stack_streams(COND, UNCOND, TOK.pad_id)
    chex.assert_shape(tokens, (2 * ROWS, PROMPT_LEN))
    return jax.tree.map(np.asarray, _guided[temperature](PARAMS, tokens, mask, key,
                                                         jnp.float32(scale)))


@pytest.mark.parametrize("temperature", [pytest.param(0.0, marks=pytest.mark.slow), 1.0])
def test_cfg_at_scale_one_is_plain_conditional_sampling(temperature):
    key = jax.random.key(7)
    plain, one = _run_plain(temperature, key), _run_guided(temperature, key, 1.0)
    np.testing.assert_array_equal(one["tokens"], plain["tokens"])
    np.testing.assert_array_equal(one["lengths"], plain["lengths"])
    np.testing.assert_allclose(one["logprobs"], plain["logprobs"], atol=2e-5)
    three = _run_guided(temperature, key, 3.0)
    assert (three["tokens"] != plain["tokens"]).any()


def test_cfg_log_probs_match_two_separate_forwards():
    scale = 2.5
    out = _run_guided(1.0, jax.random.key(3), scale)
    for row in range(ROWS):
        n = int(out["lengths"][row])
        gen = out["tokens"][row, :n]
        cond, uncond = _log_softmax64([np.concatenate([COND[row], gen]),
                                       np.concatenate([UNCOND[row], gen])] + [[1]] * (ROWS - 2))[:2]
        for t in range(n):
            mixed = uncond[len(UNCOND[row]) - 1 + t] + scale * (cond[len(COND[row]) - 1 + t]
                                                               - uncond[len(UNCOND[row]) - 1 + t])
            top = mixed.max()
            reference = mixed[gen[t]] - top - np.log(np.exp(mixed - top).sum())
            np.testing.assert_allclose(out["logprobs"][row, t], reference, atol=1e-4)


# ----------------------------------------------------------------------------- constraints


def test_unpack_bitmask_matches_numpy():
    bits = np.random.default_rng(0).integers(-2**31, 2**31, (3, 9), dtype=np.int64).astype(np.int32)
    expected = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :CFG.vocab_size]
    np.testing.assert_array_equal(np.asarray(sampling.unpack_bitmask(jnp.asarray(bits),
                                                                      CFG.vocab_size)),
                                  expected.astype(bool))


REGEX = r"(yes|no)-[0-9]{1,3}"


def test_regex_constrained_samples_all_match_and_unconstrained_do_not():
    texts, accepted = constraints.generate_text(PARAMS, CFG, TOK, PROMPTS, regex=REGEX,
                                                max_new_tokens=N_NEW, temperature=1.0)
    assert all(accepted), texts
    assert all(re.fullmatch(REGEX, t) for t in texts), texts
    assert len(set(texts)) > 1  # sampled, not one forced string
    free = _run_plain(1.0, jax.random.key(0))["tokens"]
    free_texts = [sampling.text_of(row, (TOK.eos_id,), TOK) for row in free]
    assert not any(re.fullmatch(REGEX, t) for t in free_texts)


@pytest.mark.slow
def test_json_schema_constrained_samples_all_validate():
    schema = {"type": "object", "additionalProperties": False, "required": ["n", "ok"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                             "ok": {"type": "boolean"}}}
    texts, accepted = constraints.generate_text(PARAMS, CFG, TOK, PROMPTS, json_schema=schema,
                                                max_new_tokens=24, temperature=1.0, seed=1)
    assert all(accepted), texts
    for text in texts:
        value = json.loads(text)
        try:
            import jsonschema
        except ImportError:  # not a dependency: check the schema's terms by hand
            assert set(value) == {"n", "ok"} and isinstance(value["ok"], bool)
            assert isinstance(value["n"], int) and 0 <= value["n"] <= 99
        else:
            jsonschema.validate(value, schema)


@pytest.mark.slow
def test_lark_grammar_constrained_samples_parse():
    grammar = 'start: item ("," item){0,2}\nitem: "a" | "bb" | NUM\nNUM: /[0-9]{1,2}/'
    texts, accepted = constraints.generate_text(PARAMS, CFG, TOK, PROMPTS, grammar=grammar,
                                                max_new_tokens=N_NEW, temperature=1.0)
    assert all(accepted)
    assert all(re.fullmatch(r"(a|bb|[0-9]{1,2})(,(a|bb|[0-9]{1,2})){0,2}", t) for t in texts)


def test_constraint_errors_name_the_kind():
    with pytest.raises(ValueError, match="regex"):
        constraints.TokenConstraint(TOK, "regex", "[", batch=1, vocab_size=CFG.vocab_size)
    with pytest.raises(ValueError, match="json_schema"):
        constraints.compile_grammar("json_schema", "{not json")
    with pytest.raises(ValueError, match="at most one"):
        constraints.constraint_from(TOK, batch=1, vocab_size=CFG.vocab_size, regex="a",
                                    grammar="start: \"a\"")


@pytest.mark.slow
def test_generate_cli_with_guidance_flags_on_a_bpe_chat_model(tmp_path):
    """`python -m ptjax.generate` with CFG against a negative prompt and a regex, on a model
    whose `tokenizers` BPE vocabulary is smaller than its logits (padded rows get no bit)."""
    import os
    import subprocess
    import sys

    from tiny_checkpoint import write_chat_model

    folder = tmp_path / "model"
    write_chat_model(folder)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in range(3):
        out = subprocess.run(
            [sys.executable, "-m", "ptjax.generate", f"--model={folder}", "--chat",
             "--prompt=Hello, world!", "--max_new_tokens=16", "--temperature=1",
             f"--seed={seed}", "--cfg_scale=2", "--negative_prompt=bye", r"--regex=[a-z]{2,6}"],
            check=True, capture_output=True, text=True, cwd=repo,
            env=dict(os.environ, PTJAX_NO_REEXEC="1", XLA_FLAGS=""))
        assert re.fullmatch(r"[a-z]{2,6}", out.stdout.strip()), out.stdout


@pytest.mark.slow  # the recipe's wiring at toy size; the real run is README's command
def test_guide_recipe_writes_every_section(tmp_path):
    from configs.guide import get_config
    from ptjax.recipes import guide

    c = get_config()
    c.model.preset = "tiny"
    c.train.update(seq_len=48, batch_size=8)
    c.demo.update(pretrain_texts=200)
    c.demo.pretrain.train.steps = 4
    c.demo.pretrain.eval.every = 4
    c.guide.update(train_questions=4, eval_questions=4, steps=3, discrete_steps=3,
                   cfg_scales=(1.0, 2.0), json_samples=2)
    summary = guide.run(c, str(tmp_path))
    assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))
    sp = summary["soft_prompt"]
    for row in ("no_prompt", "continuous_start", "continuous", "nearest_tokens",
                "discrete_start", "discrete"):
        assert np.isfinite(sp[row]["objective"]) and 0 <= sp[row]["accuracy"] <= 1
    assert set(summary["cfg"]["scales"]) == {"1.0", "2.0"}
    assert summary["constrained"]["regex"]["constrained_matching"] == 1.0
    assert summary["constrained"]["json_schema"]["constrained_valid"] == 1.0

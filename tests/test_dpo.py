"""DPO: loss and gradient against float64 autodiff of an independent model, the LoRA reference
(adapters off: log 2 at the start, one copy of the base), and runs that learn a separable
preference with both kinds of reference."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ptjax import data as D
from ptjax import peft
from ptjax.data import pairs as P
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.recipes import dpo as dpo_recipe
from ptjax.train import dpo, policy
from ptjax.train.config import base_config
from reference_model import logits as reference_logits

CFG = preset("tiny")
TOK = D.ByteTokenizer()


def _records(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(list("abcdef"), rng.integers(2, 6)))
        answer = "".join(rng.choice(list("xyz"), rng.integers(1, 4)))
        out.append(D.PreferenceRecord(f"Q: {word}\nA: ", answer + "!", answer + "?"))
    return out


def _f64_sequence_logps(params, batch, side, average):
    tokens = jnp.asarray(batch[f"{side}_tokens"])
    mask = jnp.asarray(batch[f"{side}_mask"])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # right padding
    out = reference_logits(params, CFG, tokens, positions, mask)
    logp = jax.nn.log_softmax(out, axis=-1)
    picked = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    resp = jnp.asarray(batch[f"{side}_response"][:, 1:], out.dtype)
    total = jnp.sum(picked * resp, axis=1)
    return total / jnp.sum(resp, axis=1) if average else total


# IPO differs from the sigmoid loss only in the scalar function of the margin, checked against
# float64 numpy in tests/test_rl_math.py; CI runs the whole autodiff path once.
@pytest.mark.parametrize("loss_type", ["sigmoid", pytest.param("ipo", marks=pytest.mark.slow)])
def test_loss_and_gradient_equal_float64_autodiff(loss_type):
    params = llama.init_params(CFG, jax.random.key(0))
    ref_params = jax.tree.map(lambda x: x * 1.05, params)
    pairs = [P.encode_pair(r, TOK, 16) for r in _records(2, 1)]
    average = loss_type == "ipo"
    ref_c, ref_r = dpo.pair_logps(ref_params, CFG, P.pair_batch(pairs, 16), average=average)
    batch = P.pair_batch(pairs, 16, extras={"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r})
    beta = 0.5

    def ours(p):
        return dpo.loss_and_stats(p, CFG, batch, beta=beta, loss_type=loss_type,
                                  label_smoothing=0.0, reference="precomputed")[0]

    loss, grads = jax.value_and_grad(ours)(params)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        r64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), ref_params)

        def theirs(p):
            delta = ((_f64_sequence_logps(p, batch, "chosen", average)
                      - _f64_sequence_logps(r64, batch, "chosen", average))
                     - (_f64_sequence_logps(p, batch, "rejected", average)
                        - _f64_sequence_logps(r64, batch, "rejected", average)))
            if loss_type == "ipo":
                return jnp.mean((delta - 1 / (2 * beta)) ** 2)
            return jnp.mean(jnp.logaddexp(0.0, -beta * delta))

        want_loss, want_grads = jax.jit(jax.value_and_grad(theirs))(p64)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=2e-5)
    flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
    want = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(want_grads)])
    np.testing.assert_allclose(np.asarray(flat), want, atol=2e-3 * np.abs(want).max())


def test_lora_reference_is_the_base_so_the_first_loss_is_log2():
    base = llama.init_params(CFG, jax.random.key(0))
    c = base_config()
    c.peft.method = "lora"
    params, _ = peft.apply(base, CFG, c.peft, jax.random.key(1))
    batch = P.pair_batch([P.encode_pair(r, TOK, 24) for r in _records(3, 2)], 24)
    kw = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference="adapters_off")
    loss, stats = dpo.loss_and_stats(params, CFG, batch, **kw)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    moved = jax.tree.map(lambda x: x, params)
    moved = policy.adapters_off(moved)  # the reference of any adapter state is this base
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(base)):
        assert a is b  # the same arrays: no second copy


def _config(method, reference):
    c = base_config()
    c.trainer = "dpo"
    c.model.preset = "tiny"
    c.peft.method = method
    c.train.update(steps=60, batch_size=16, seq_len=24, log_every=30)
    c.eval.update(every=60, max_batches=4)
    c.optim.update(lr=1e-2 if method == "lora" else 3e-3, warmup_steps=5)
    c.checkpoint.update(every=60, async_save=False)
    c.dpo = ml_collections.ConfigDict({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                       "reference": reference, "eval_fraction": 0.2})
    return c


@pytest.mark.parametrize("method,reference", [
    pytest.param("lora", "auto", marks=pytest.mark.slow),
    pytest.param("full", "auto", marks=pytest.mark.slow)])
def test_dpo_learns_a_separable_preference(tmp_path, method, reference):
    path = tmp_path / "prefs.jsonl"
    D.write_jsonl(path, [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
                         for r in _records(160, 3)])
    c = _config(method, reference)
    c.data.train = str(path)
    params = llama.init_params(CFG, jax.random.key(0))
    workdir = str(tmp_path / "run")
    pairs = [P.encode_pair(r, TOK, 24) for r in D.read_preference_jsonl(path)]
    train_pairs, eval_pairs = pairs[:128], pairs[128:]
    dpo_recipe.run(c, workdir, train_pairs, eval_pairs, init_params=params, model_cfg=CFG,
                   tokenizer=TOK)
    stage = json.load(open(os.path.join(workdir, "summary.json")))["stages"]["dpo"]
    assert stage["reference"] == ("adapters_off" if method == "lora" else "precomputed")
    assert stage["reward_accuracy"] >= 0.9 and stage["loss"] < np.log(2) - 0.05, stage

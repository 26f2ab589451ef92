"""Pruning: exact sparsity and N:M structure, masks that stay zero through optimizer steps, the
Zhu & Gupta schedule against its closed form, and the sparsity report."""

import functools

import jax
import numpy as np
import optax
import pytest

from ptjax import nodes, ops, prune
from ptjax import tree as ptree
from ptjax.bench import random_batch
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.prune import masks, schedule
from ptjax.train import sft
from ptjax.train import state as state_lib
from ptjax.train.config import base_config

CFG = preset("tiny")
BASE = jax.device_get(llama.init_params(CFG, jax.random.key(0)))
W = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)


def _cfg(**kw):
    c = base_config().prune
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_keeps_exactly_the_largest(sparsity):
    mask = masks.magnitude(W, sparsity)
    kept = W.size - int(np.floor(W.size * sparsity))
    assert mask.sum() == kept
    if 0 < kept < W.size:  # every kept |w| is at least every pruned |w|
        assert np.abs(W)[mask].min() >= np.abs(W)[~mask].max()


def test_ties_still_give_the_exact_count():
    mask = masks.magnitude(np.ones((8, 8), np.float32), 0.25)
    assert mask.sum() == 48


def test_two_of_four_along_the_input_dimension():
    mask = masks.n_of_m(np.abs(W), 2, 4)
    groups = mask.reshape(16, 4, 24)
    assert (groups.sum(axis=1) == 2).all()
    a = np.abs(W).reshape(16, 4, 24)
    assert (np.where(groups, a, np.inf).min(1) >= np.where(groups, -np.inf, a).max(1)).all()
    with pytest.raises(ValueError, match="prune.structure"):
        masks.n_of_m(np.ones((6, 3)), 2, 4)


def test_per_output_and_global_counts():
    per = masks.per_output(np.abs(W), 0.5)
    assert (per.sum(axis=0) == 32).all()
    both = masks.global_magnitude({"a": W, "b": 10 * W[:8]}, 0.5)
    assert both["a"].sum() + both["b"].sum() == (W.size + W[:8].size) // 2
    assert both["b"].mean() > both["a"].mean()  # the larger layer keeps more


def test_random_mask_count_and_independence_from_values():
    a, b = masks.random((64, 24), 0.5, seed=1), masks.random((64, 24), 0.5, seed=2)
    assert a.sum() == b.sum() == W.size // 2 and (a != b).any()


def test_zhu_gupta_schedule_equals_the_closed_form():
    kw = dict(start=10, end=110, every=20, final=0.8, initial=0.1)
    for step in range(0, 130):
        got = schedule.sparsity_at(step, **kw)
        if step < 10:
            want = 0.1
        elif step >= 110:
            want = 0.8
        else:
            t = 10 + (step - 10) // 20 * 20
            want = 0.8 + (0.1 - 0.8) * (1 - (t - 10) / 100) ** 3
        assert got == pytest.approx(want, abs=1e-12), step
    assert [s for s in range(130) if schedule.is_update_step(s, start=10, end=110, every=20)] == \
        [10, 30, 50, 70, 90, 110]
    with pytest.raises(ValueError, match="prune.schedule"):
        schedule.sparsity_at(5, start=10, end=10, every=1, final=0.5)


@pytest.mark.parametrize("method,structure", [("magnitude", ""), ("global", ""), ("random", ""),
                                              ("magnitude", "2:4")])
def test_apply_prunes_the_targets_and_the_report_counts_them(method, structure):
    params = prune.apply(BASE, _cfg(method=method, structure=structure, sparsity=0.5))
    masked = nodes.nodes_of(params, prune.Masked)
    assert len(masked) == 7 * CFG.layers
    r = prune.report(params)
    assert r["overall"] == pytest.approx(0.5, abs=1e-3)
    if method != "global":
        assert all(s == pytest.approx(0.5, abs=0.01) for s in r["layers"].values())
    merged = nodes.merge(params)
    q = np.asarray(merged["layers_0"]["attn"]["q"]["kernel"])
    assert np.mean(q == 0) == pytest.approx(r["layers"]["layers_0/attn/q/kernel"])
    if method != "global":  # a global threshold prunes some layers more than others
        assert np.mean(q == 0) == pytest.approx(0.5, abs=0.01)
    np.testing.assert_array_equal(merged["embed"]["embedding"], BASE["embed"]["embedding"])


def test_pruned_weights_stay_exactly_zero_through_adamw_steps():
    params = prune.apply(BASE, _cfg(method="magnitude", sparsity=0.6))
    tx = optax.adamw(0.05, weight_decay=0.1)
    mask = ptree.trainable_mask(params, ".*")  # full fine-tuning: masks are not trainable
    assert not any(v for p, v in ptree.flatten_with_paths(mask) if p.endswith("/mask"))
    state = state_lib.create(params, mask, tx, seed=0)
    batch = random_batch(2, 16, CFG.vocab_size)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=CFG, tx=tx))
    before = nodes.merge(state.params)
    for _ in range(3):
        state, _ = step(state, batch, None)
    after = nodes.merge(state.params)
    for path, node in ptree.flatten_with_paths(state.params, nodes_as_leaves=True):
        if isinstance(node, prune.Masked):
            keep = np.asarray(node.mask)
            np.testing.assert_array_equal(np.asarray(node.base)[~keep], 0, err_msg=path)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), after, before)
    assert moved["layers_0"]["mlp"]["up"]["kernel"] > 0  # the kept weights did train


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="prune.method"):
        prune.check(_cfg(method="wanda2"))
    with pytest.raises(ValueError, match="prune.structure"):
        prune.check(_cfg(method="magnitude", structure="4:2"))
    with pytest.raises(ValueError, match="prune.sparsity"):
        prune.check(_cfg(method="magnitude", sparsity=1.5))
    with pytest.raises(ValueError, match="prune.targets"):
        prune.apply(BASE, _cfg(method="magnitude", targets="nothing"))


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_wanda_equals_a_float64_reference_and_prunes_layers_in_sequence():
    tokens = np.random.default_rng(3).integers(3, CFG.vocab_size, (4, 24))
    params = prune.apply(BASE, _cfg(method="wanda", sparsity=0.5), CFG, tokens)
    # Layer 0's q/k/v read the normed embeddings: |W| * ||X_i|| in float64, top half per output.
    x = _rms(np.asarray(BASE["embed"]["embedding"], np.float64)[tokens].reshape(-1, CFG.hidden),
             np.asarray(BASE["layers_0"]["attn_norm"]["scale"], np.float64), CFG.norm_eps)
    norms = np.sqrt((x * x).sum(0))
    for name in ("q", "k", "v"):
        w = np.asarray(BASE["layers_0"]["attn"][name]["kernel"], np.float64)
        scores = np.abs(w) * norms[:, None]
        keep = CFG.hidden // 2
        threshold = -np.sort(-scores, axis=0)[keep - 1]
        want = scores >= threshold
        got = np.asarray(params["layers_0"]["attn"][name]["kernel"].mask)
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert (got.sum(0) == keep).all()
    # Layer 1 is scored on the outputs of the pruned layer 0, not the dense one.
    dense_first = prune.apply(BASE, _cfg(method="wanda", sparsity=0.5, targets="layers_1/"), CFG,
                              tokens)
    a = np.asarray(params["layers_1"]["mlp"]["down"]["kernel"].mask)
    b = np.asarray(dense_first["layers_1"]["mlp"]["down"]["kernel"].mask)
    assert (a != b).any()
    assert prune.report(params)["overall"] == pytest.approx(0.5)


def test_wanda_two_of_four_and_calibration_rows():
    rows = prune.calibration_rows([(np.arange(50), None), (np.arange(30), None)], 16, 10)
    assert rows.shape == (5, 16) and rows[1, 0] == 16
    tokens = np.random.default_rng(4).integers(3, CFG.vocab_size, (2, 16))
    params = prune.apply(BASE, _cfg(method="wanda", structure="2:4"), CFG, tokens)
    m = np.asarray(params["layers_1"]["mlp"]["gate"]["kernel"].mask)
    assert (m.reshape(-1, 4, m.shape[1]).sum(1) == 2).all()
    with pytest.raises(ValueError, match="calibration"):
        prune.apply(BASE, _cfg(method="wanda"))


def _obs_reference(w_in_out, x, sparsity, block, damp=0.01):
    """Optimal brain surgeon, column by column of PyTorch's [out, in], written with the inverse
    of the remaining Hessian block `inv(H[i:, i:])` recomputed at every column (no Cholesky, no
    lazy batching): the same choices SparseGPT's reference code makes, computed another way."""
    w = np.asarray(w_in_out, np.float64).T.copy()
    n = w.shape[1]
    h = 2 * x.T @ x / x.shape[0]
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    pruned = np.zeros_like(w, bool)
    for i in range(n):
        if i % block == 0:
            d2 = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(i, min(i + block, n))])
            score = w[:, i:i + block] ** 2 / d2[None, :]  # w^2 / U_jj^2 (U_jj^2 = d2)
            cut = int(score.size * sparsity)
            pruned[:, i:i + block] = score <= np.sort(score.reshape(-1))[cut - 1]
        hs = np.linalg.inv(h[i:, i:])
        q = np.where(pruned[:, i], 0.0, w[:, i])
        w[:, i:] -= np.outer((w[:, i] - q) / hs[0, 0], hs[0, :])
        w[:, i] = q
    return w.T, ~pruned.T


def test_sparsegpt_equals_an_obs_reference_and_beats_magnitude():
    from ptjax.prune import calibration

    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 32)) @ rng.standard_normal((32, 32)) * 0.5  # correlated inputs
    w = rng.standard_normal((32, 12)).astype(np.float32)
    got, keep = calibration.sparsegpt(w, x.T @ x, x.shape[0], 0.5, block=8)
    want, want_keep = _obs_reference(w, x, 0.5, block=8)
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert keep.sum() == w.size // 2 and (got[~keep] == 0).all()
    dense = x @ w
    magnitude = np.where(masks.per_output(np.abs(w), 0.5), w, 0)
    err = lambda v: np.linalg.norm(x @ v - dense)  # noqa: E731
    assert err(got) < 0.85 * err(magnitude)  # 191 vs 243 here
    # 2:4 keeps exactly two of every four inputs per output.
    _, keep24 = calibration.sparsegpt(w, x.T @ x, x.shape[0], 0.5, structure=(2, 4), block=8)
    assert (keep24.reshape(8, 4, 12).sum(1) == 2).all()


def test_sparsegpt_through_the_model_prunes_every_projection():
    tokens = np.random.default_rng(6).integers(3, CFG.vocab_size, (4, 24))
    params = prune.apply(BASE, _cfg(method="sparsegpt", sparsity=0.5), CFG, tokens)
    r = prune.report(params)
    assert len(r["layers"]) == 7 * CFG.layers and r["overall"] == pytest.approx(0.5, abs=0.01)
    kept = params["layers_1"]["mlp"]["up"]["kernel"]
    base = np.asarray(BASE["layers_1"]["mlp"]["up"]["kernel"])
    assert np.abs(np.asarray(kept.base)[np.asarray(kept.mask)] -
                  base[np.asarray(kept.mask)]).max() > 1e-4  # kept weights were updated


def _gradual_run(workdir, steps=12):
    """Full fine-tuning of the tiny model with magnitude pruning rising from 10% at step 2 to
    60% at step 10, masks updated every 2 steps, checkpoints every 6."""
    from ptjax import data as D
    from ptjax.train import trainer

    config = base_config()
    config.model.preset = "tiny"
    config.train.update(steps=steps, batch_size=8, seq_len=32, log_every=6)
    config.eval.every = 0
    config.checkpoint.update(every=6, keep=3, async_save=False)
    config.optim.lr = 0.02
    config.prune.update(method="magnitude", sparsity=0.6, initial_sparsity=0.1, start_step=2,
                        end_step=10, every=2)
    tok = D.ByteTokenizer()
    examples = [D.encode_sft(r, tok, 32) for r in D.instruction_records(80, seed=0)]
    return trainer.train(config, str(workdir), examples, show_progress=False), config


def test_gradual_pruning_follows_the_schedule_and_resumes_with_its_masks(tmp_path):
    import json
    import os
    import shutil

    result, config = _gradual_run(tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = {r["step"]: r["prune/sparsity"] for r in rows if "prune/sparsity" in r}
    assert sorted(logged) == [2, 4, 6, 8, 10]
    for step, sparsity in logged.items():  # exact per-layer counts, so within rounding
        assert sparsity == pytest.approx(prune.gradual_sparsity(config.prune, step), abs=2e-3)
    assert logged[2] == pytest.approx(0.1, abs=2e-3) and logged[10] == pytest.approx(0.6, abs=2e-3)
    report = prune.report(result.params)
    assert report["overall"] == pytest.approx(0.6, abs=2e-3)

    # Resume from step 6 (the step-12 checkpoint removed): the masks chosen at steps 2-6 come back
    # from the checkpoint, so the rerun ends exactly where the uninterrupted run did.
    final = jax.device_get(result.params)
    shutil.rmtree(os.path.join(tmp_path, "checkpoints", "12"))
    resumed, _ = _gradual_run(tmp_path)
    for (path, a), (_, b) in zip(ptree.flatten_with_paths(final),
                                 ptree.flatten_with_paths(jax.device_get(resumed.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_gradual_masks_only_grow_and_never_revive_a_weight():
    c = _cfg(method="magnitude", sparsity=0.75, initial_sparsity=0.0, start_step=0,
             end_step=30, every=10)
    params = prune.apply(BASE, c)
    assert prune.report(params)["overall"] == 0.0
    rng = np.random.default_rng(1)
    previous = None
    for step in (10, 20, 30):
        # Training moves weights between updates; pruned entries stay zero in the effective weight.
        params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32)
                              if np.asarray(x).dtype == np.float32 else x, params)
        params = prune.update_masks(params, c, step)
        kept = {p: np.asarray(n.mask) for p, n in ptree.flatten_with_paths(params, nodes_as_leaves=True)
                if isinstance(n, prune.Masked)}
        if previous is not None:
            for p in kept:
                assert not np.any(kept[p] & ~previous[p]), p  # nothing pruned comes back
        previous = kept
        assert prune.report(params)["overall"] == pytest.approx(prune.gradual_sparsity(c, step),
                                                                 abs=2e-3)


def test_gradual_config_errors_name_the_key():
    with pytest.raises(ValueError, match="prune.end_step"):
        prune.check(_cfg(method="wanda", end_step=10))
    with pytest.raises(ValueError, match="prune.end_step"):
        prune.check(_cfg(method="magnitude", structure="2:4", end_step=10))
    with pytest.raises(ValueError, match="prune.initial_sparsity"):
        prune.check(_cfg(method="magnitude", sparsity=0.5, initial_sparsity=0.7, end_step=10))
    with pytest.raises(ValueError, match="prune.schedule"):
        prune.check(_cfg(method="magnitude", start_step=10, end_step=10))


def test_pruned_then_quantized_keeps_zeros_and_the_mask():
    from ptjax import quant

    pruned = prune.apply(BASE, _cfg(method="magnitude", sparsity=0.5))
    for method in ("int8", "int4", "nf4"):
        c = base_config().quant
        c.method = method
        both = quant.apply(pruned, c)
        node = both["layers_0"]["mlp"]["up"]["kernel"]
        assert isinstance(node, prune.Masked) and isinstance(node.base, quant.QUANTIZED_NODES), method
        w = np.asarray(node.materialize())
        base_zero = np.asarray(ops.materialize(node.base)) == 0
        np.testing.assert_array_equal(w[~np.asarray(node.mask)], 0)
        np.testing.assert_array_equal(base_zero[~np.asarray(node.mask)], True)  # format maps 0 to 0
        assert prune.report(both)["overall"] == pytest.approx(0.5, abs=2e-3)

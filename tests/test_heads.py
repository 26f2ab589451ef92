"""New heads on a frozen body: only the head trains, and it learns a task the body supports."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptjax import tree as ptree
from ptjax.models import heads, llama
from ptjax.models.config import preset
from ptjax.train import state as state_lib

CFG = preset("tiny")


def test_last_token_index_and_padding_invariance():
    seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(heads.last_token_index(seg), [2, 4, 3])
    params = heads.add_head(llama.init_params(CFG, jax.random.key(0)), CFG, jax.random.key(1))
    tokens = jnp.array([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]])
    out = jax.jit(functools.partial(heads.head_outputs, cfg=CFG))(
        params, tokens=tokens, segment_ids=jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)  # what follows the last token is ignored


def test_classifier_on_frozen_body_trains_only_the_head():
    """Through the train state (regex mask, split, AdamW with weight decay on every trainable
    leaf): the head learns, and after the optimizer steps every body leaf is bitwise what it
    was, although the body does receive gradient when it is not frozen."""
    params = llama.init_params(CFG, jax.random.key(0))
    params = heads.add_head(params, CFG, jax.random.key(1), name="cls_head", outputs=2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 60, (32, 8)).astype(np.int32)
    labels = (tokens[:, -1] % 2).astype(np.int32)  # parity of the last token: readable from it
    seg = np.ones_like(tokens)

    def loss(params):
        logits = heads.head_outputs(params, CFG, tokens, seg, name="cls_head")
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), labels])

    tx = optax.adamw(0.1, weight_decay=0.1)
    state = state_lib.create(params, ptree.select(params, r"^cls_head/"), tx, seed=0)
    assert {p for p, _ in ptree.flatten_with_paths(state.trainable)} == {"cls_head/kernel",
                                                                          "cls_head/bias"}

    @jax.jit
    def step(state):
        value, g = jax.value_and_grad(lambda tr: loss(ptree.merge(tr, state.frozen)))(state.trainable)
        updates, opt = tx.update(g, state.opt_state, state.trainable)
        return state.replace(trainable=optax.apply_updates(state.trainable, updates),
                             opt_state=opt), value

    first = None
    for _ in range(60):
        state, value = step(state)
        first = value if first is None else first
    assert float(loss(state.params)) < 0.5 * float(first)
    after = dict(ptree.flatten_with_paths(state.params))
    full_grads = dict(ptree.flatten_with_paths(jax.grad(loss)(params)))
    for path, before in ptree.flatten_with_paths(params):
        if path.startswith("cls_head/"):
            assert not np.array_equal(after[path], before), path
        else:
            np.testing.assert_array_equal(after[path], before, err_msg=path)
            assert after[path].dtype == before.dtype
    assert np.abs(full_grads["layers_1/mlp/down/kernel"]).max() > 0  # freezing is what kept it

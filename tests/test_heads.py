"""New heads on a frozen body: only the head trains, and it learns a task the body supports."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptjax import tree as ptree
from ptjax.models import heads, llama
from ptjax.models.config import preset

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
    params = llama.init_params(CFG, jax.random.key(0))
    params = heads.add_head(params, CFG, jax.random.key(1), name="cls_head", outputs=2)
    trainable, frozen = ptree.split(params, ptree.select(params, r"^cls_head/"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 60, (32, 8)).astype(np.int32)
    labels = (tokens[:, -1] % 2).astype(np.int32)  # parity of the last token: readable from it
    seg = np.ones_like(tokens)

    def loss(tr):
        logits = heads.head_outputs(ptree.merge(tr, frozen), CFG, tokens, seg, name="cls_head")
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), labels])

    tx = optax.adam(0.1)
    opt = tx.init(trainable)

    @jax.jit
    def step(tr, opt):
        value, g = jax.value_and_grad(loss)(tr)
        updates, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, updates), opt, value, g

    first = None
    for _ in range(60):
        trainable, opt, value, g = step(trainable, opt)
        first = value if first is None else first
    assert set(p for p, _ in ptree.flatten_with_paths(g)) == {"cls_head/kernel", "cls_head/bias"}
    assert float(loss(trainable)) < 0.5 * float(first)

"""The step profile (`ptjax.step_profile`, `bench --profile`): traced time charged to operations.

Why: the README's account of where a train step's time goes comes from it, so it must charge the
matmul to the matmul, a loop's body to the body (not twice, once more through the loop), and
find the program's instructions in the trace at all.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import step_profile


def test_short_op_names_the_pass_and_the_primitive():
    assert step_profile.short_op("jvp()/while/body/closed_call/dot_general") == "forward/dot_general"
    assert step_profile.short_op("transpose(jvp())/convert_element_type") == \
        "backward/convert_element_type"
    assert step_profile.short_op("reduce_sum") == "other/reduce_sum"


def test_op_names_leave_out_loops_but_keep_their_bodies():
    def body(i, x):
        return jnp.tanh(x @ x)

    f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, body, x))
    compiled = f.lower(jnp.ones((64, 64), jnp.float32)).compile()
    text = compiled.as_text()
    names = step_profile.op_names(text)
    assert any(op.endswith("dot_general") for op in names.values())
    loops = [line.split(" = ")[0].strip().lstrip("%") for line in text.splitlines()
             if " while(" in line]
    assert loops, "the loop should compile to an HLO while"
    assert not any(name in names for name in loops)
    x = jnp.ones((64, 64), jnp.float32)

    def run():
        compiled(x).block_until_ready()

    run()
    ops = {o["op"]: o for o in step_profile.profile(compiled, run, steps=2)["ops"]}
    assert ops["other/dot_general"]["calls"] == 3, ops  # the body's matmul, once per iteration


def test_profile_charges_a_matmul_heavy_program_to_its_matmul():
    a = jnp.asarray(np.random.default_rng(0).standard_normal((512, 512)), jnp.float32)
    f = jax.jit(lambda x: jnp.dot(x, x) + 1.0)
    compiled = f.lower(a).compile()

    def run():
        compiled(a).block_until_ready()

    run()
    p = step_profile.profile(compiled, run, steps=3)
    ops = {o["op"]: o for o in p["ops"]}
    assert "other/dot_general" in ops, p
    # a 512^3 dot is ~0.27 GFLOP; the +1 over 512^2 floats is a rounding error next to it
    assert p["matmul_share"] > 0.5, p
    assert ops["other/dot_general"]["ms"] > 0
    assert ops["other/dot_general"]["calls"] == 1  # one matmul per call, traced once
    assert abs(sum(o["share"] for o in p["ops"]) - 1.0) < 0.01
    assert p["traced_ms"] >= ops["other/dot_general"]["ms"]

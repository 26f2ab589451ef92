"""Throughput, MFU and memory of the jitted train step (and later: generation, adapters).

    python -m ptjax.bench --preset=llama-56m --method=full --batch=8 --seq=512 --dtype=bfloat16

Prints one JSON object per case. MFU is model FLOPs per second over the bf16 matmul ceiling
measured in the same process (a large bf16 x bf16 -> f32 dot), because that ceiling varies between
runs and machines; `mfu_f32_ceiling` relates the same rate to a large f32 dot. Warm-up steps are
discarded (the first calls into XLA's fast matmul library are slow).
"""

from ptjax import runtime

runtime.reexec_with_fast_allocator()  # must happen before JAX starts

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from ptjax import peft, quant  # noqa: E402
from ptjax import tree as ptree  # noqa: E402
from ptjax.data import ByteTokenizer  # noqa: E402
from ptjax.models import llama  # noqa: E402
from ptjax.models.config import ModelConfig, preset  # noqa: E402
from ptjax.train import sft  # noqa: E402
from ptjax.train import state as state_lib  # noqa: E402
from ptjax.train.config import base_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama-56m", "Model preset.")
flags.DEFINE_list("method", ["full"], "Methods to time: full, frozen (the bound for adapters: "
                  "only the input embeddings train), lora, qlora (LoRA on an NF4 base), dora, "
                  "ia3, adapter, prompt, ptuning, prefix.")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("seq", 512, "Tokens per sequence.")
flags.DEFINE_list("dtype", ["bfloat16"], "Compute dtypes to time (bfloat16, float32).")
flags.DEFINE_integer("steps", 5, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 2, "Discarded steps after compilation.")
flags.DEFINE_string("remat", "none", "Rematerialization: none or full.")


def matmul_ceiling(dtype, n: int = 0, repeats: int = 5) -> float:
    """FLOP/s of a large square dot with f32 accumulation: the roof the step is measured against
    (2048 on CPU, 8192 on an accelerator, which a smaller product cannot fill)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())),
                                                 preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    f(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in the layer matmuls, parameters in the output head)."""
    d, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * cfg.mlp
    return cfg.layers * per_layer, d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq: int, trainable_matmul_params: int) -> float:
    """Model FLOPs per trained token: 2N forward + 2N input-gradient for every matmul, + 2N
    weight-gradient for trainable ones, and the attention dots (QK^T and PV, 3x for backward)."""
    layers, head = matmul_params(cfg)
    n = layers + head
    attention = 2 * 2 * seq * cfg.heads * cfg.head_dim * cfg.layers
    return 4 * n + 2 * trainable_matmul_params + 3 * attention


def method_params(cfg: ModelConfig, method: str, params):
    """(params, trainable regex) of a benchmark method: `full`, `frozen` (only the input
    embeddings train, so the backward pass runs through every layer without weight gradients:
    the bound for adapters), `qlora` (LoRA on an NF4 double-quantized base) or a PEFT method at
    its benchmark settings (LoRA/DoRA r=16, alpha=32 on all attention and MLP projections)."""
    if method == "frozen":
        return params, r"^embed/"
    c = base_config()
    if method == "qlora":  # LoRA on an NF4 base with double-quantized absmax
        c.quant.method, method = "nf4", "lora"
    c.peft.method = method
    c.peft.rank, c.peft.alpha, c.peft.num_virtual = 16, 32.0, 16
    params = quant.apply(params, c.quant)
    return peft.apply(params, cfg, c.peft, jax.random.key(3), ByteTokenizer())


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """A full (unpadded, one example per row) batch of random tokens."""
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(3, vocab, (batch, seq), dtype=np.int32),
        "targets": rng.integers(3, vocab, (batch, seq), dtype=np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }


def host_init(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random params drawn with numpy (normal(0, 0.02) matrices, unit norm scales): a deep
    model's jitted random init takes minutes to compile on GPU, and throughput does not care."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: llama.init_params(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(np.ones(s.shape, np.float32) if len(s.shape) == 1
                                              else 0.02 * rng.standard_normal(s.shape, np.float32)),
                        shapes)


def time_train_step(cfg: ModelConfig, method: str, batch: int, seq: int, steps: int,
                    warmup: int) -> dict:
    """Compile and time one train step; returns timing, memory and trainable-size figures."""
    params = host_init(cfg)
    params, trainable = method_params(cfg, method, params)
    mask = ptree.trainable_mask(params, trainable)
    tx = optax.adamw(1e-4)
    state = state_lib.create(params, mask, tx, seed=0, frozen_matmul_dtype=cfg.compute_dtype)
    del params
    data = random_batch(batch, seq, cfg.vocab_size)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=cfg, tx=tx), donate_argnums=0)
    t = time.perf_counter()
    compiled = step.lower(state, data, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, data, jax.random.key(1))
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    trainable_matmul = sum(int(np.prod(v.shape)) for p, v in ptree.flatten_with_paths(state.trainable)
                           if re.search(r"kernel(/(a|b|down|up))?$", p))
    return {
        "step_s": float(np.median(times)),
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "trainable_params": ptree.count(state.trainable),
        "optimizer_state_mb": ptree.nbytes(state.opt_state) / 2**20,
        "parameter_mb": (ptree.nbytes(state.trainable) + ptree.nbytes(state.frozen)) / 2**20,
        "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
        "trainable_matmul_params": trainable_matmul,
    }


def device_peak_memory() -> dict:
    """Peak accelerator memory of this process, where the backend reports it (not on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return {}
    return {"device_peak_mb": round(stats["peak_bytes_in_use"] / 2**20, 1)}


def run_case(method: str, dtype: str):
    """Time one (method, dtype) case in this process and print its JSON line."""
    ceiling_bf16 = matmul_ceiling(jnp.bfloat16)
    ceiling_f32 = matmul_ceiling(jnp.float32)
    cfg = preset(FLAGS.preset, dtype=dtype, remat=FLAGS.remat)
    r = time_train_step(cfg, method, FLAGS.batch, FLAGS.seq, FLAGS.steps, FLAGS.warmup)
    tokens_per_s = FLAGS.batch * FLAGS.seq / r["step_s"]
    flops = flops_per_token(cfg, FLAGS.seq, r.pop("trainable_matmul_params"))
    print(json.dumps({
        "case": f"{FLAGS.preset}-{method}-{dtype}-b{FLAGS.batch}-s{FLAGS.seq}",
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops / ceiling_bf16, 4),
        "mfu_f32_ceiling": round(tokens_per_s * flops / ceiling_f32, 4),
        "model_tflops_per_s": round(tokens_per_s * flops / 1e12, 4),
        "bf16_ceiling_tflops": round(ceiling_bf16 / 1e12, 4),
        "f32_ceiling_tflops": round(ceiling_f32 / 1e12, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **device_peak_memory(),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
        "device": jax.devices()[0].device_kind,
    }), flush=True)


def main(argv):
    cases = [(m, d) for d in FLAGS.dtype for m in FLAGS.method]
    if len(cases) == 1:
        run_case(*cases[0])
        return
    # One process per case, so each case's peak RSS is its own.
    for method, dtype in cases:
        args = [a for a in argv[1:] if not a.startswith(("--method", "--dtype"))]
        subprocess.run([sys.executable, "-m", "ptjax.bench", f"--method={method}",
                        f"--dtype={dtype}", *[f"--{f}={getattr(FLAGS, f)}" for f in
                        ("preset", "batch", "seq", "steps", "warmup", "remat")], *args],
                       check=True)


if __name__ == "__main__":
    app.run(main)

"""Throughput, MFU and memory of the jitted train step, and of greedy KV-cache generation.

    python -m ptjax.bench --preset=llama-56m --method=full --batch=8 --seq=512 --dtype=bfloat16
    python -m ptjax.bench --preset=llama-56m --method=generate --batch=16 --prompt_len=64 \
        --new_tokens=128 --dtype=bfloat16
    python -m ptjax.bench --preset=llama-56m --method=full --batch=1 --seq=2048,4096,8192
    python -m ptjax.bench --plan --preset=llama2-7b --mesh=fsdp:8 --method=qlora,lora,full
    python -m ptjax.bench --preset=llama-56m --method=qlora --profile   # + time by operation

Prints one JSON object per case. MFU is model FLOPs per second over the bf16 matmul ceiling
measured in the same process (a large bf16 x bf16 -> f32 dot), because that ceiling varies between
runs and machines; `mfu_f32_ceiling` relates the same rate to a large f32 dot. Warm-up steps are
discarded (the first calls into XLA's fast matmul library are slow).

Generation (`generate`) is bound by memory, not FLOPs: a decode step must read every weight and
the filled part of the KV cache, for a few FLOPs per byte. Its roof is therefore a large array
copy measured in the same process (`copy_bandwidth_gb_s`), and `bandwidth_floor_fraction` says
how close the decode steps come to it (see `generation_case`).
"""

import sys

from ptjax import runtime

runtime.simulate_host_devices_for_plan(sys.argv)  # both must happen before JAX starts
runtime.reexec_with_fast_allocator()

import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from ptjax import peft, quant, sampling, step_profile  # noqa: E402
from ptjax import tree as ptree  # noqa: E402
from ptjax.data import ByteTokenizer  # noqa: E402
from ptjax.models import llama  # noqa: E402
from ptjax.models.config import ModelConfig, preset  # noqa: E402
from ptjax.peft import prompts  # noqa: E402
from ptjax.train import sft  # noqa: E402
from ptjax.train import state as state_lib  # noqa: E402
from ptjax.train.config import base_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama-56m", "Model preset.")
flags.DEFINE_list("method", ["full"], "Methods to time: full, frozen (the bound for adapters: "
                  "only the input embeddings train), lora, qlora (LoRA on an NF4 base), dora, "
                  "ia3, adapter, prompt, ptuning, prefix; or generate (greedy KV-cache "
                  "decoding of --batch prompts of --prompt_len tokens by --new_tokens tokens).")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_list("seq", ["512"], "Tokens per sequence; several (2048,4096,8192) time each.")
flags.DEFINE_integer("prompt_len", 64, "generate: prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "generate: tokens decoded per row (never stopped early).")
flags.DEFINE_list("dtype", ["bfloat16"], "Compute dtypes to time (bfloat16, float32).")
flags.DEFINE_integer("steps", 5, "Timed steps, or generate calls (median reported).")
flags.DEFINE_integer("warmup", 2, "Discarded steps (generate calls) after compilation.")
flags.DEFINE_string("remat", "none", "Rematerialization: none or full.")
flags.DEFINE_bool("scan_layers", True, "Layers as one lax.scan (False: unrolled loop).")
flags.DEFINE_bool("plan", False, "Print the step's per-device memory plan (compiled from shapes, "
                  "without and with remat, and analytic) instead of timing it.")
flags.DEFINE_string("mesh", "", "--plan: the mesh, e.g. fsdp:8 or data:2,fsdp:2,tensor:2.")
flags.DEFINE_bool("profile", False, "Train cases: also trace two steps with jax.profiler and add "
                  "the step's time by operation (`ptjax.step_profile`) to the JSON line.")
flags.DEFINE_integer("layers", 0, "Override the preset's depth (0: the preset's own), e.g. to see "
                     "how compile time grows with depth under --plan.")


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


# Dense bf16 peak FLOP/s of accelerators by a piece of their `device_kind` (first match wins;
# the makers' data sheets, without sparsity).
CARD_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                  ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12),
                  ("TPU v4", 275e12))


def card_peak_flops() -> float | None:
    """The data-sheet bf16 peak of this process's first device, None on CPU or when unknown.

    Why: on an accelerator MFU is quoted against the card's peak (MaxText, PaLM); the ceiling
    measured in the run stays beside it, since it is what the CPU rows use."""
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in CARD_PEAK_BF16 if name in kind), None)


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


def train_step_case(cfg: ModelConfig, method: str, batch: int, seq: int, donate: bool = True):
    """(jitted SFT train step, its first state, a random batch) of a benchmark method.

    Why a function: the timer below and `benchmarks/ab_step.py` (which traces the same step
    twice, once under a variant's patches) must time exactly the same step. `donate`: the step
    writes the new state over the old one, as in training; without it a state can be reused.
    """
    params, trainable = method_params(cfg, method, host_init(cfg))
    mask = ptree.trainable_mask(params, trainable)
    tx = optax.adamw(1e-4)
    state = state_lib.create(params, mask, tx, seed=0, frozen_matmul_dtype=cfg.compute_dtype)
    step = jax.jit(functools.partial(sft.train_step, model_cfg=cfg, tx=tx),
                   donate_argnums=0 if donate else ())
    return step, state, random_batch(batch, seq, cfg.vocab_size)


def time_train_step(cfg: ModelConfig, method: str, batch: int, seq: int, steps: int,
                    warmup: int, profile: bool = False) -> dict:
    """Compile and time one train step; returns timing, memory and trainable-size figures
    (and, with `profile`, the step's time by operation after the timed steps)."""
    step, state, data = train_step_case(cfg, method, batch, seq)
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
    by_op = {}
    if profile:
        def run():
            nonlocal state
            state, m = compiled(state, data, jax.random.key(1))
            jax.block_until_ready(m)

        by_op = {"profile": step_profile.profile(compiled, run)}
    return {
        "step_s": float(np.median(times)),
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "trainable_params": ptree.count(state.trainable),
        "optimizer_state_mb": ptree.nbytes(state.opt_state) / 2**20,
        "parameter_mb": (ptree.nbytes(state.trainable) + ptree.nbytes(state.frozen)) / 2**20,
        "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
        "trainable_matmul_params": trainable_matmul,
        **by_op,
    }


def device_peak_memory() -> dict:
    """Peak accelerator memory of this process, where the backend reports it (not on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return {}
    return {"device_peak_mb": round(stats["peak_bytes_in_use"] / 2**20, 1)}


# ----------------------------------------------------------------------------- generation


def cast_floats(params, dtype):
    """Every float leaf outside weight nodes in `dtype` (quantized nodes keep their parts)."""
    def visit(_, x):
        if ptree.is_weight_node(x) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)

    return ptree.map_with_path(visit, params, nodes_as_leaves=True)


def decode_step_bytes(params, cfg: ModelConfig, batch: int) -> int:
    """Weight bytes one decode step reads: every leaf, but only `batch` rows of an untied input
    embedding table (the lookup reads nothing else)."""
    total = 0
    for path, x in ptree.flatten_with_paths(params):
        n = int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        if path.startswith("embed/") and not cfg.tie_embeddings:
            n = batch * cfg.hidden * np.dtype(x.dtype).itemsize
        total += n
    return total


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: float, dtype) -> float:
    """Bytes of the keys and values of `length` cached tokens in every layer."""
    return 2 * cfg.layers * batch * cfg.kv_heads * cfg.head_dim * length * jnp.dtype(dtype).itemsize


def mean_cache_fill(prompt_len: int, new_tokens: int) -> float:
    """Cached tokens a decode step attends over, averaged over the `new_tokens` steps: step i
    writes token i after the prompt's and reads prompt_len + i + 1 entries."""
    return prompt_len + (new_tokens + 1) / 2


def timed(fn, *args, runs: int, warmup: int = 2):
    """(median seconds, last output) of `runs` calls of `fn(*args)` after `warmup` discarded
    calls (the first calls into XLA's matmul library are slow)."""
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


@functools.lru_cache(maxsize=8)
def prefill_fn(cfg: ModelConfig, max_new_tokens: int):
    """A jitted `fn(params, tokens, mask) -> (next-token logits, cache)`: exactly the part of
    `sampling.generate` before its decode loop (same cache size, so the same attention work).

    Why a copy of those lines rather than a flag on the sampler: the benchmark needs the
    prefill as its own program to time it apart, and the sampler should not grow knobs for it.
    """

    def fn(params, tokens, mask):
        b, p = tokens.shape
        mask = mask.astype(jnp.int32)
        params = sampling.inference_params(params, cfg)
        embeds, positions, prefix = prompts.model_inputs(params, cfg, tokens,
                                                         sampling.positions_from_mask(mask))
        cache = llama.init_cache(cfg, b, p + max_new_tokens, prefix=prefix)
        hidden, cache = llama.decode(params, cfg, embeds, positions, mask, cache)
        return llama.logits_from_hidden(params, cfg, hidden[:, -1]), cache

    return jax.jit(fn)


def time_generation(params, cfg: ModelConfig, tokens, mask, new_tokens: int, runs: int,
                    warmup: int = 2) -> dict:
    """Prefill and decode seconds of greedy generation with the library's jitted sampler.

    The sampler (`sampling.make_generate_fn`, temperature 0) runs with a stop id of -1, which
    argmax never returns, so every call decodes exactly `new_tokens` tokens (checked). Its
    prefill is timed as its own program (`prefill_fn`), and decode seconds are the whole
    call's median minus the prefill's: the `new_tokens` loop steps, each one token per row
    through the model (the last step's logits go unused, see `sampling.generate`). Compilation
    is excluded; medians of `runs` calls after `warmup` discarded ones. Returns `prefill_s`,
    `decode_s`, `total_s`, `compile_s`, `temp_mb` (the generate program's XLA temporaries) and
    the generated `tokens` [b, new_tokens].
    """
    key = jax.random.key(0)
    t = time.perf_counter()
    full = sampling.make_generate_fn(cfg, new_tokens, eos_id=-1).lower(
        params, tokens, mask, key).compile()
    compile_s = time.perf_counter() - t
    first = prefill_fn(cfg, new_tokens).lower(params, tokens, mask).compile()
    total_s, out = timed(full, params, tokens, mask, key, runs=runs, warmup=warmup)
    prefill_s, _ = timed(first, params, tokens, mask, runs=runs, warmup=warmup)
    lengths = np.asarray(out["lengths"])
    if not (lengths == new_tokens).all():
        raise RuntimeError(f"generation stopped early: lengths {lengths.tolist()}")
    return {"prefill_s": prefill_s, "decode_s": max(total_s - prefill_s, 1e-9),
            "total_s": total_s, "compile_s": compile_s,
            "temp_mb": full.memory_analysis().temp_size_in_bytes / 2**20,
            "tokens": np.asarray(out["tokens"])}


def copy_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second (read + written) of a jitted elementwise pass over a `mib` MiB float32
    array, median of `repeats`: the memory roof a decode step is compared against. `x + 1`
    rather than `x + 0`, which XLA may fold to a plain copy of the input buffer or nothing."""
    x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    seconds, _ = timed(f, x, runs=repeats, warmup=2)
    return 2 * x.nbytes / seconds


def cpu_flags() -> str:
    """The CPU's model and bf16-relevant flags: figures mean something only next to these."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    found = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in out]
    name = [line.split(":", 1)[1].strip() for line in out.splitlines()
            if line.startswith("Model name")]
    return ", ".join((name[:1] or [platform.processor()]) + found)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def generation_case(preset_name: str, dtype: str, batch: int, prompt_len: int, new_tokens: int,
                    runs: int = 5, warmup: int = 2, copy_mib: int = 1024) -> dict:
    """The `generate` benchmark's JSON record: greedy decoding of `batch` random prompts of
    `prompt_len` tokens by `new_tokens` tokens, random weights stored in the compute `dtype`
    (a bf16 run keeps every float leaf in bf16, as a PyTorch `model.to(torch.bfloat16)` does).

    `bytes_per_decode_step` is what one decode step must read: the weights
    (`decode_step_bytes`: every matrix, norm and the head, only `batch` embedding rows) plus
    the keys and values of the cached tokens at the mean fill (`mean_cache_fill`). Divided by
    the step time it is the bandwidth the decode loop achieves; `bandwidth_floor_fraction` is
    that over the copy bandwidth (1 = the step takes no longer than reading its bytes once).
    It is the bytes a step must read, not those the program happens to touch: the model's
    attention runs over all prompt_len + new_tokens preallocated cache slots, masked, so it
    reads more cache than the filled part (up to a third more at the default sizes).
    `peak_rss_mb` is read before the copy measurement, whose 2 GiB would otherwise dominate it.
    """
    cfg = preset(preset_name, dtype=dtype)
    params = host_init(cfg)
    if cfg.compute_dtype != jnp.float32:
        params = cast_floats(params, cfg.compute_dtype)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size,
                                                           (batch, prompt_len), dtype=np.int32))
    mask = jnp.ones(tokens.shape, bool)
    r = time_generation(params, cfg, tokens, mask, new_tokens, runs, warmup)
    weight_bytes = decode_step_bytes(params, cfg, batch)
    kv_bytes = kv_cache_bytes(cfg, batch, mean_cache_fill(prompt_len, new_tokens),
                              cfg.compute_dtype)
    step_bytes = weight_bytes + kv_bytes
    step_s = r["decode_s"] / new_tokens
    rss = peak_rss_mb()
    copy = copy_bandwidth(copy_mib)
    return {
        "case": f"{preset_name}-generate-{dtype}-b{batch}-p{prompt_len}-n{new_tokens}",
        "decode_tokens_per_s": round(batch * new_tokens / r["decode_s"], 1),
        "prefill_tokens_per_s": round(batch * prompt_len / r["prefill_s"], 1),
        "e2e_tokens_per_s": round(batch * new_tokens / r["total_s"], 1),
        "decode_step_ms": round(1e3 * step_s, 3),
        "prefill_s": round(r["prefill_s"], 4),
        "total_s": round(r["total_s"], 4),
        "bytes_per_decode_step": round(step_bytes),
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_step": round(kv_bytes),
        "decode_gb_s": round(step_bytes / step_s / 1e9, 3),
        "copy_bandwidth_gb_s": round(copy / 1e9, 3),
        "bandwidth_floor_fraction": round(step_bytes / step_s / copy, 4),
        "compile_s": round(r["compile_s"], 2),
        "temp_mb": round(r["temp_mb"], 1),
        "peak_rss_mb": rss,
        **device_peak_memory(),
        "device": jax.devices()[0].device_kind,
        "cpu": cpu_flags(),
    }


def depth_override() -> dict:
    """`--layers` as a preset override (empty when it keeps the preset's depth)."""
    return {"layers": FLAGS.layers} if FLAGS.layers else {}


def run_case(method: str, dtype: str, seq: int):
    """Time one (method, dtype, sequence length) case in this process and print its JSON line."""
    if method == "generate":
        print(json.dumps(generation_case(FLAGS.preset, dtype, FLAGS.batch, FLAGS.prompt_len,
                                         FLAGS.new_tokens, FLAGS.steps, FLAGS.warmup)),
              flush=True)
        return
    ceiling_bf16 = matmul_ceiling(jnp.bfloat16)
    ceiling_f32 = matmul_ceiling(jnp.float32)
    cfg = preset(FLAGS.preset, dtype=dtype, remat=FLAGS.remat, scan_layers=FLAGS.scan_layers,
                 **depth_override())
    r = time_train_step(cfg, method, FLAGS.batch, seq, FLAGS.steps, FLAGS.warmup, FLAGS.profile)
    tokens_per_s = FLAGS.batch * seq / r["step_s"]
    flops = flops_per_token(cfg, seq, r.pop("trainable_matmul_params"))
    print(json.dumps({
        "case": f"{FLAGS.preset}-{method}-{dtype}-b{FLAGS.batch}-s{seq}",
        "layers": cfg.layers, "scan_layers": cfg.scan_layers, "remat": cfg.remat,
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops / ceiling_bf16, 4),
        "mfu_f32_ceiling": round(tokens_per_s * flops / ceiling_f32, 4),
        **({"mfu_card_peak": round(tokens_per_s * flops / peak, 4)}
           if (peak := card_peak_flops()) else {}),
        "model_tflops_per_s": round(tokens_per_s * flops / 1e12, 4),
        "bf16_ceiling_tflops": round(ceiling_bf16 / 1e12, 4),
        "f32_ceiling_tflops": round(ceiling_f32 / 1e12, 4),
        "peak_rss_mb": peak_rss_mb(),
        **device_peak_memory(),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
        "device": jax.devices()[0].device_kind,
    }), flush=True)


def main(argv):
    if FLAGS.plan:
        from ptjax import plan

        cfg = preset(FLAGS.preset, dtype=FLAGS.dtype[0], scan_layers=FLAGS.scan_layers,
                     **depth_override())
        for method in FLAGS.method:
            for seq in FLAGS.seq:
                print(json.dumps(plan.plan(cfg, method, FLAGS.mesh, FLAGS.batch, int(seq),
                                           method_params)),
                      flush=True)
        return
    cases = [(m, d, int(s)) for d in FLAGS.dtype for m in FLAGS.method
             for s in (FLAGS.seq if m != "generate" else FLAGS.seq[:1])]
    if len(cases) == 1:
        run_case(*cases[0])
        return
    # One process per case, so each case's peak RSS is its own.
    for method, dtype, seq in cases:
        args = [a for a in argv[1:] if not a.startswith(("--method", "--dtype", "--seq"))]
        subprocess.run([sys.executable, "-m", "ptjax.bench", f"--method={method}",
                        f"--dtype={dtype}", f"--seq={seq}", *[f"--{f}={getattr(FLAGS, f)}" for f in
                        ("preset", "batch", "prompt_len", "new_tokens", "steps", "warmup",
                         "remat", "scan_layers", "layers", "profile")], *args],
                       check=True)


if __name__ == "__main__":
    app.run(main)

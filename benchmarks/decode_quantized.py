"""Greedy KV-cache decode of weight-only int8 and NF4 models against bf16: tokens/s, weight bytes
read per decode step, and how often the quantized model's greedy tokens match the float ones.

    python benchmarks/decode_quantized.py                        # llama-56m, random weights
    python benchmarks/decode_quantized.py --gguf=$(python -m ptjax.interop.fetch smollm2)
    python benchmarks/decode_quantized.py --formats=bf16,int8 --dtypes=float32 --batches=16

Why this shape: decoding a token reads every weight once and does ~2 FLOPs per weight per row,
so at small batch it is bound by weight bytes (and, on CPU, by per-op overhead); quantized
storage should then be no slower than bf16. Each case is (format, compute dtype, batch):

- formats: `f32` (reference, float32 compute only), `bf16` (every param cast to bfloat16),
  `int8` (per-output-channel symmetric int8 codes + float32 scales), `nf4` (bitsandbytes NF4,
  64-blocks, double-quantized absmax). For int8 and nf4 the leaves that stay float (embedding,
  output head, norms) are stored as in the bf16 case (`--rest_dtype`), so the only difference
  from bf16 is the projection kernels.
- compute dtypes: bfloat16 and float32 (on an AVX2-only CPU bf16 dots are emulated, so float32
  compute over bf16 / quantized storage can be faster; report each format's fastest).

int8 and NF4 decode through the fused dequantize-and-multiply kernels (`ptjax.kernels.cpu`) on
CPUs with AVX-512 BF16 (the header line says whether they ran); `PTJAX_FUSED_KERNELS=0` measures
XLA's dequantize-then-dot path instead.

Timing is `ptjax.bench.time_generation`, shared with `python -m ptjax.bench --method=generate`:
the library's jitted sampler (`ptjax.sampling.make_generate_fn`, temperature 0, no stop id, so
every step runs) for n = `--new_tokens`, and its prefill as a program of its own, medians of
`--runs` calls after two warm-up calls, compile excluded; decode seconds per step are
(T(generate) - T(prefill)) / n, and decode tokens/s = batch / that. Bytes per step
(`bench.decode_step_bytes`) count every param leaf a decode step reads (codes, scales and absmax
of quantized nodes; norms; the head), except the input embedding table, of which only the
`batch` looked-up rows are read (a tied table is read whole by the head). The KV cache read is
reported apart (`kv_bytes`, at the mean fill, `bench.mean_cache_fill`).

Agreement: positionwise fraction of generated tokens equal to the f32 reference's (`agree_f32`)
and to bf16/bfloat16's (`agree_bf16`), and the mean common-prefix length as a fraction of n
(`prefix_f32`). `temp_mb` is the compiled program's temporary memory (XLA's own figure): it
shows when weights are dequantized (or converted) once, outside the decode loop, and held whole
in float for the generation: the bf16 embedding table and output head are (by the model's
embed/head code, in every format alike), so under float32 compute a step really reads the head
in float32; quantized kernels no longer are (`ptjax.quant.intq._dequantized_matmul`).
Random weights give near-uniform logits, so their argmax flips easily; the real model
(`--gguf`, prompts cut from Python's bundled documentation) is the meaningful check.
Prints one JSON line per case, then a markdown table.
"""

from ptjax import runtime

runtime.reexec_with_fast_allocator()  # must happen before JAX starts

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ptjax import bench, quant  # noqa: E402
from ptjax.kernels import cpu as kernels_cpu  # noqa: E402
from ptjax.bench import cast_floats, cpu_flags, decode_step_bytes  # noqa: E402
from ptjax.models.config import preset  # noqa: E402
from ptjax.train.config import base_config  # noqa: E402

FORMATS = ("f32", "bf16", "int8", "nf4")
DTYPES = ("bfloat16", "float32")


def format_params(params32, fmt: str, rest_dtype: str):
    """The benchmark model in one storage format (see the module docstring)."""
    if fmt == "f32":
        return params32
    if fmt == "bf16":
        return cast_floats(params32, jnp.bfloat16)
    c = base_config().quant
    c.method = fmt
    return cast_floats(quant.apply(params32, c), jnp.dtype(rest_dtype))


def prompts_for(args, cfg, tokenizer):
    """[batches max, prompt_len] int32 prompts: real text for a real model, else random ids."""
    rows = max(args.batches)
    if tokenizer is None:
        return np.random.default_rng(0).integers(3, cfg.vocab_size, (rows, args.prompt_len),
                                                 dtype=np.int32)
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = np.asarray(tokenizer.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    stride = len(ids) // rows  # prompts from far-apart places of Python's documentation
    return np.stack([ids[i * stride:i * stride + args.prompt_len] for i in range(rows)])


def agreement(tokens, reference):
    """(positionwise match fraction, mean common-prefix fraction) of two [b, n] token arrays."""
    if reference is None:
        return None, None
    same = np.asarray(tokens) == np.asarray(reference)
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return float(same.mean()), float(prefix.mean() / same.shape[1])


def run_case(params, cfg, fmt, dtype, batch, prompts, args, references):
    """One (format, compute dtype, batch) measurement as a dict."""
    cfg = dataclasses.replace(cfg, dtype=dtype)
    n = args.new_tokens
    tokens = jnp.asarray(prompts[:batch])
    mask = jnp.ones(tokens.shape, bool)
    r = bench.time_generation(params, cfg, tokens, mask, n, args.runs)
    step = r["decode_s"] / n
    generated = r["tokens"]
    references.setdefault((fmt, dtype, batch), generated)
    agree_f32, prefix_f32 = agreement(generated, references.get(("f32", "float32", batch)))
    agree_bf16, _ = agreement(generated, references.get(("bf16", "bfloat16", batch)))
    kv_bytes = bench.kv_cache_bytes(cfg, batch, bench.mean_cache_fill(args.prompt_len, n), dtype)
    weight_bytes = decode_step_bytes(params, cfg, batch)
    return {
        "format": fmt, "dtype": dtype, "batch": batch, "prompt_len": args.prompt_len,
        "new_tokens": n, "decode_tokens_per_s": batch / step, "decode_ms_per_step": 1e3 * step,
        "prefill_s": r["prefill_s"], "total_s": r["total_s"],
        "e2e_tokens_per_s": batch * n / r["total_s"], "weight_bytes_per_step": weight_bytes,
        "weight_gb_per_s": weight_bytes / step / 1e9, "kv_bytes": int(kv_bytes),
        "agree_f32": agree_f32, "prefix_f32": prefix_f32, "agree_bf16": agree_bf16,
        "temp_mb": r["temp_mb"] * 2**20 / 1e6, "compile_s": r["compile_s"],
    }


def table(rows):
    """A markdown table of the cases, fastest compute dtype of each (format, batch) marked *."""
    best = {}
    for r in rows:
        k = (r["format"], r["batch"])
        best[k] = max(best.get(k, 0.0), r["decode_tokens_per_s"])
    lines = ["| format | compute | batch | decode tok/s | ms/step | prefill s | weight MB/step "
             "| temp MB | agree f32 | agree bf16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        star = "*" if r["decode_tokens_per_s"] == best[(r["format"], r["batch"])] else ""
        lines.append(f"| {r['format']} | {r['dtype']} | {r['batch']} | "
                     f"{r['decode_tokens_per_s']:.0f}{star} | {r['decode_ms_per_step']:.1f} | "
                     f"{r['prefill_s']:.3f} | {r['weight_bytes_per_step'] / 1e6:.1f} | "
                     f"{r['temp_mb']:.0f} | "
                     f"{fmt(r['agree_f32'])} | {fmt(r['agree_bf16'])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-56m")
    p.add_argument("--gguf", default="", help="a GGUF file (e.g. SmolLM2-135M) instead of a preset")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rest_dtype", default="bfloat16",
                   help="storage of the float leaves int8/nf4 leave alone (embedding, head)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    formats = [f for f in FORMATS if f in args.formats.split(",")]
    dtypes = args.dtypes.split(",")

    tokenizer = None
    if args.gguf:
        from ptjax.interop import load

        model = load.load(args.gguf)
        cfg, params32, tokenizer = model.config, jax.device_get(model.params), model.tokenizer
    else:
        cfg = preset(args.preset)
        params32 = bench.host_init(cfg)
    prompts = prompts_for(args, cfg, tokenizer)
    print(json.dumps({"cpu": cpu_flags(), "jax": jax.__version__,
                      "model": args.gguf or args.preset,
                      "fused_kernels": kernels_cpu.available()}), flush=True)
    rows, references = [], {}
    for fmt in formats:
        params = format_params(params32, fmt, args.rest_dtype)
        for dtype in dtypes:
            if fmt == "f32" and dtype != "float32":
                continue
            for batch in args.batches:
                row = run_case(params, cfg, fmt, dtype, batch, prompts, args, references)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()

"""PyTorch reference for greedy KV-cache generation (CPU or CUDA), the peer of
`python -m ptjax.bench --method=generate`.

Builds a randomly initialised ``transformers.LlamaForCausalLM`` with the shape of one of
ptjax's benchmark presets (``MODELS`` of ``pytorch_baseline.py``; SDPA attention, transformers'
default dynamic KV cache), stores its weights in ``--dtype`` (bfloat16: ``model.to(bfloat16)``,
as ptjax's bf16 run stores every float leaf in bf16; float32: plain), and times
``model.generate(input_ids, attention_mask, max_new_tokens=N, min_new_tokens=N,
do_sample=False)`` on random prompts under ``torch.inference_mode``. ``min_new_tokens`` keeps
EOS from ending a row early, so every call decodes exactly N tokens (checked).

Timing, the same quantity ptjax reports: T(N), the median generate call with N new tokens,
and T(1), one with a single new token, which is the prefill (one forward of the prompt; its
logits give token 1). The N - 1 other tokens each cost one single-token forward, so a decode
step is (T(N) - T(1)) / (N - 1) and ``decode_tokens_per_s`` = batch / step (ptjax's
batch * N / decode seconds: its loop runs N single-token forwards); ``prefill_tokens_per_s`` =
batch * prompt_len / T(1). Medians over ``--runs`` calls after ``--warmup`` discarded ones.

This script is NOT part of the ptjax package or its tests and needs PyTorch; run it in the
separate venv of ``pytorch_baseline.py``:

    /work/torchvenv/bin/python benchmarks/pytorch_generate.py --model llama-56m \\
        --dtype bfloat16 --batch 16 --prompt_len 64 --new_tokens 128

Prints one JSON line; per-call times go to stderr. Run it on otherwise idle cores: on the
2-core CPU, with one other busy process, ``--threads 2`` generate calls took 10-15x longer
(OpenMP threads waiting on a descheduled peer; ``--threads 1`` kept its speed), while ptjax
under the same load slowed far less.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import transformers
from pytorch_baseline import MODELS  # same folder: the script's directory is on sys.path
from transformers import LlamaConfig, LlamaForCausalLM

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build_model(name: str, dtype: torch.dtype, device: str = "cpu") -> LlamaForCausalLM:
    """A randomly initialised Llama of preset `name` in eval mode, weights in `dtype` on
    `device`."""
    config = LlamaConfig(**MODELS[name])
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0  # random prompts need no padding; silences a warning
    return model


def timed_generate(model, ids, mask, new_tokens: int, runs: int, warmup: int) -> float:
    """Median seconds of `runs` greedy generate calls after `warmup` discarded ones."""
    cuda = ids.device.type == "cuda"
    times = []
    for i in range(warmup + runs):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        if cuda:  # kernels run asynchronously: wait for the last one before reading the clock
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, "
                               f"not {new_tokens}")
        print(f"generate n={new_tokens} call {i} ({'warmup' if i < warmup else 'timed'}): "
              f"{dt:.3f} s", file=sys.stderr, flush=True)
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama-56m")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new_tokens must be at least 2 (one prefill token and a decode step)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model, DTYPES[args.dtype], args.device)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len)).to(args.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        total_s = timed_generate(model, ids, mask, args.new_tokens, args.runs, args.warmup)
        prefill_s = timed_generate(model, ids, mask, 1, args.runs, args.warmup)
    step_s = max(total_s - prefill_s, 1e-9) / (args.new_tokens - 1)

    print(json.dumps({
        "case": f"torch-{args.model}-generate-{args.dtype}-b{args.batch}-p{args.prompt_len}"
                f"-n{args.new_tokens}",
        "decode_tokens_per_s": round(args.batch / step_s, 1),
        "prefill_tokens_per_s": round(args.batch * args.prompt_len / prefill_s, 1),
        "e2e_tokens_per_s": round(args.batch * args.new_tokens / total_s, 1),
        "decode_step_ms": round(1e3 * step_s, 3),
        "prefill_s": round(prefill_s, 4),
        "total_s": round(total_s, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()

"""PyTorch reference for training-step throughput (CPU), for comparison with ptjax.

Builds a randomly initialised ``transformers.LlamaForCausalLM`` with the shape of
one of ptjax's benchmark presets (--model: llama-56m, ~50M params, or
smollm2-135m, SmolLM2-135M's shape; SDPA attention) and times training steps
(forward + loss.backward() + AdamW step + zero_grad) on random tokens.

This script is NOT part of the ptjax package or its tests and needs PyTorch,
which ptjax does not depend on. Run it in a separate venv, e.g.:

    python3 -m venv /work/torchbench/venv
    /work/torchbench/venv/bin/pip install torch==2.13.0          # CPU wheel
    /work/torchbench/venv/bin/pip install transformers peft psutil "torch==2.13.0"
    /work/torchbench/venv/bin/python benchmarks/pytorch_baseline.py \\
        --method full --dtype bfloat16 --batch 8 --seq 512 --steps 5 --warmup 2

--dtype bfloat16 runs the forward under torch.autocast("cpu", bfloat16) with
float32 master weights; --dtype float32 runs plain float32. --method lora wraps
the model with peft LoRA (r=16, alpha=32, all attention + MLP projections) and
optimises only the LoRA parameters; --method qlora does the same on an NF4 base with double
quantization (transformers + bitsandbytes, compute in --dtype). Prints one JSON line with the median step
time over the timed (non-warm-up) steps.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


# The model shapes ptjax's benchmark presets use (ptjax/models/config.py), by preset name.
MODELS = {
    "llama-56m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                      tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                     tie_word_embeddings=True),
}


def quantized_4bit(model: torch.nn.Module, compute_dtype: torch.dtype,
                   device: str = "cpu") -> torch.nn.Module:
    """The model reloaded through transformers' bitsandbytes integration onto `device`: NF4
    with double quantization (QLoRA's base), norms kept in float32, no gradient
    checkpointing."""
    import tempfile

    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa", device_map={"": device},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build_model(method: str, name: str = "llama-56m",
                compute_dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> torch.nn.Module:
    config = LlamaConfig(**MODELS[name])
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(torch.float32)
    if method == "qlora":
        model = quantized_4bit(model, compute_dtype, device)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora_cfg = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_cfg)
    model.train()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama-56m")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    compute_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = build_model(args.method, args.model, compute_dtype, args.device)
    if args.method != "qlora":  # the quantized model was loaded onto the device
        model = model.to(args.device)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size

    def step() -> float:
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if args.dtype == "bfloat16":
            with torch.autocast(args.device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if not torch.isfinite(loss.detach()):  # bool() of a device tensor waits for it
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return time.perf_counter() - t0

    times = []
    for i in range(args.warmup + args.steps):
        dt = step()
        kind = "warmup" if i < args.warmup else "timed"
        print(f"step {i} ({kind}): {dt:.3f} s", file=sys.stderr, flush=True)
        if i >= args.warmup:
            times.append(dt)
    step_s = statistics.median(times)

    print(json.dumps({
        "case": f"torch-{args.model}-{args.method}-{args.dtype}-b{args.batch}-s{args.seq}",
        "tokens_per_s": round(args.batch * args.seq / step_s, 2),
        "step_s": round(step_s, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()

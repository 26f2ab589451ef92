#!/usr/bin/env bash
# The GPU check: ptjax next to PyTorch on the same card, in one run.
#
#     benchmarks/gpu.sh [scale] [generate] [qlora] [decode_quantized] [tests] [train]
#
# With no argument every section runs; `scale` (issue 9: llama-1b full and LoRA with MFU against
# the card's peak, long-context memory, compile time against depth, the kernel tests) is first
# and fits one 10-minute call on its own. Run from the repository root on a machine with a CUDA GPU
# and jax[cuda], torch, transformers and peft installed (wheels of ml-collections, tensorboardX,
# gguf and bitsandbytes in .whl/ are installed to /tmp/site first when present). Writes one JSON
# line per case to ${OUT:-.}/gpu_bench.jsonl and the tests' log to ${OUT:-.}/gpu_tests.log.
# Each case has its own timeout, so one that hangs or fails costs its slot, not the run.
set -u -o pipefail
OUT=${OUT:-.}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PTJAX_NO_REEXEC=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
log=$OUT/gpu_bench.jsonl
sections=${*:-scale generate qlora decode_quantized tests train}
nvidia-smi -L
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

for section in $sections; do
  echo "=== $section ($(date +%T))"
  case $section in
  scale)  # Issue 9 on one GPU; MFU in each JSON line as mfu_card_peak (data-sheet bf16 peak).
    JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 \
      python3 -m pytest -q -m "not slow" -p no:cacheprovider tests/test_long_context.py \
      tests/test_ops.py tests/test_model.py 2>&1 | tee "$OUT/gpu_scale_tests.log" | tail -15
    # Full and LoRA fine-tuning of Llama-3.2-1B's shape, bf16, batch 8 x 2048 (cuDNN attention).
    timeout 200 python3 -m ptjax.bench --preset=llama-1b --method=full,lora --dtype=bfloat16 \
      --batch=8 --seq=2048 --steps=5 --warmup=2 | tee -a "$log"
    # Long context: full fine-tuning of llama-56m at batch 1, device peak memory per length.
    timeout 120 python3 -m ptjax.bench --preset=llama-56m --method=full --dtype=bfloat16 \
      --batch=1 --seq=2048,4096,8192,32768 --steps=3 --warmup=1 | tee -a "$log"
    # Compile time against depth (layers as one scan): llama-1b's width at 16 and 80 layers.
    for layers in 16 80; do
      timeout 100 python3 -m ptjax.bench --plan --preset=llama-1b --layers=$layers --method=full \
        --dtype=bfloat16 --batch=1 --seq=2048 | tee -a "$log"
    done
    ;;
  train)  # The issue-6 case: SmolLM2-135M shape, LoRA r=16 (and full), bf16, batch 8 x 512.
    timeout 200 python3 -m ptjax.bench --preset=smollm2-135m --method=lora,full --dtype=bfloat16 \
      --batch=8 --seq=512 --steps=10 --warmup=3 | tee -a "$log"
    for method in lora full; do
      timeout 100 python3 benchmarks/pytorch_baseline.py --model smollm2-135m --method $method \
        --dtype bfloat16 --device cuda --batch 8 --seq 512 --steps 10 --warmup 3 2>/dev/null | tee -a "$log"
    done
    # A size that fills the card: Llama-3.2-1B's shape, full fine-tuning, bf16, batch 4 x 2048.
    timeout 150 python3 -m ptjax.bench --preset=llama-1b --method=full --dtype=bfloat16 \
      --batch=4 --seq=2048 --steps=5 --warmup=2 | tee -a "$log"
    timeout 100 python3 benchmarks/pytorch_baseline.py --model llama-1b --method full \
      --dtype bfloat16 --device cuda --batch 4 --seq 2048 --steps 5 --warmup 2 2>/dev/null | tee -a "$log"
    ;;
  qlora)  # The issue-7 case: llama-56m, batch 8 x 512, bf16; QLoRA against LoRA and bitsandbytes.
    timeout 150 python3 -m ptjax.bench --preset=llama-56m --method=qlora,lora --dtype=bfloat16 \
      --batch=8 --seq=512 --steps=10 --warmup=3 | tee -a "$log"
    for method in qlora lora; do
      timeout 100 python3 benchmarks/pytorch_baseline.py --model llama-56m --method $method \
        --dtype bfloat16 --device cuda --batch 8 --seq 512 --steps 10 --warmup 3 2>&1 \
        | grep -E '^\{|Error' | tee -a "$log"
    done
    ;;
  generate)  # The issue-8 case (batch 16) and batch 1: greedy decode against transformers' generate.
    for batch in 16 1; do
      timeout 120 python3 -m ptjax.bench --preset=llama-56m --method=generate --batch=$batch \
        --prompt_len=64 --new_tokens=128 --dtype=bfloat16 | tee -a "$log"
      timeout 120 python3 benchmarks/pytorch_generate.py --model llama-56m --dtype bfloat16 \
        --device cuda --batch $batch --prompt_len 64 --new_tokens 128 --runs 3 2>/dev/null | tee -a "$log"
    done
    ;;
  decode_quantized)  # Weight-only int8 and NF4 decode against bf16 storage, bf16 compute.
    timeout 200 python3 benchmarks/decode_quantized.py --formats=bf16,int8,nf4 --dtypes=bfloat16 \
      --batches=1,16 --new_tokens=128 --runs=3 | tee -a "$log"
    ;;
  tests)  # The numerics that do not need 8 devices, on the GPU backend, f32 dots at full precision.
    JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 170 \
      python3 -m pytest -q -m "not slow" -p no:cacheprovider --timeout=60 \
      tests/test_parity_bnb.py tests/test_quant.py tests/test_rl_math.py tests/test_sampling.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | tail -40
    ;;
  *) echo "unknown section $section"; exit 2 ;;
  esac
done
echo "=== done ($(date +%T))"

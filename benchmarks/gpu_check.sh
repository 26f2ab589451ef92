#!/usr/bin/env bash
# The GPU check: ptjax's train step next to PyTorch + PEFT on the same card, in one run.
#
# Run from the repository root on a machine with a CUDA GPU and jax[cuda], torch, transformers
# and peft installed (wheels of ml-collections, tensorboardX and gguf in .whl/ are installed
# to /tmp/site first when present). Writes one JSON line per case to ${OUT:-.}/gpu_bench.jsonl.
set -u -o pipefail
OUT=${OUT:-.}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PTJAX_NO_REEXEC=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
log=$OUT/gpu_bench.jsonl
nvidia-smi -L
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

# The case: SmolLM2-135M shape, LoRA r=16 (and full), bf16, batch 8 x 512.
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

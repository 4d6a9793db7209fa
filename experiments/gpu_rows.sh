#!/usr/bin/env bash
# The GPU rows of both benchmarks, as one prepared run for a lent GPU machine (H100/H200).
#
# Here (a machine with pip), once: fetch what the GPU image lacks (tyro and its needs) as wheels
# into .whl/ (ignored by git: `echo /.whl/ >> .git/info/exclude`):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux2014_x86_64 -d .whl \
#         tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
# There, from the repository root, carrying .whl:
#     bash experiments/gpu_rows.sh            # writes $OUT/gpu_rows.log (or ./gpu_rows.log)
#
# Runs, each with its PyTorch side on the same GPU: bench_generate on gpt2-medium (batch 64,
# prompt 32, 128 new tokens, bfloat16) and bench_dpo_step on gpt2-medium and gpt2-large (8 pairs x
# 512 tokens, bfloat16, cuDNN attention on our side), then our gpt2-large step with XLA's
# attention; then the same two benchmarks on a modern architecture, Llama-3.2-1B's shape (GQA,
# RoPE, SwiGLU, untied 128k vocabulary; random weights) against transformers' LlamaForCausalLM.
# About 8-11 minutes on an H100, compile included (the Llama rows last: cut them if time is short).
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-.}/gpu_rows.log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU: allocate on demand instead of grabbing 75 % of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, jax.devices())"
  echo "== bench_generate gpt2-medium"
  timeout 200 python3 experiments/bench_generate.py --shape gpt2-medium --batch 64 \
    --new-tokens 128 --dtype bfloat16
  for shape in gpt2-medium gpt2-large; do
    echo "== bench_dpo_step $shape (our attention: cuDNN)"
    timeout 200 python3 experiments/bench_dpo_step.py --shape "$shape" --seq-len 512 \
      --dtype bfloat16
  done
  # Our side alone with XLA's attention: the cuDNN path's gain, and a row if cuDNN fails there.
  echo "== bench_dpo_step gpt2-large (ours only, our attention: XLA)"
  timeout 150 python3 experiments/bench_dpo_step.py --shape gpt2-large --seq-len 512 \
    --dtype bfloat16 --sides jax --attention xla --no-roofline
  echo "== bench_generate llama-3.2-1b"
  timeout 200 python3 experiments/bench_generate.py --shape llama-3.2-1b --batch 64 \
    --new-tokens 128 --dtype bfloat16
  echo "== bench_dpo_step llama-3.2-1b (our attention: cuDNN)"
  timeout 240 python3 experiments/bench_dpo_step.py --shape llama-3.2-1b --seq-len 512 \
    --dtype bfloat16
} 2>&1 | tee "$log"

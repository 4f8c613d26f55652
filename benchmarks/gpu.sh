#!/usr/bin/env bash
# Every accelerator measurement of tailjax in one command, sized for one H100/H200 and under 8 minutes:
#   the fused head (--preset h100), the eval step's memory plan then the measured run (Qwen2-0.5B- and
#   Llama-3-8B-shaped pairs, bf16, T=2048), the distillation step, tailjax's causal attention vs XLA's and
#   cuDNN's, and the bf16 precision tests of the head, on the device.
#
# On this (CPU) machine, once:   bash benchmarks/gpu.sh --fetch-wheels
#   (the device image has JAX with CUDA, flax, optax, orbax, transformers, torch, but not grain or gguf:
#    their Python 3.12 wheels go to .gpu-wheels/, which git ignores and the device call carries)
# On the device:                 bash benchmarks/gpu.sh        (device tool: carry [".gpu-wheels"])
# Logs go to $OUT (or /tmp/tailjax-gpu); the tables end the output, for benchmarks/RESULTS.md.
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    grain==0.2.18 array-record portpicker gguf==0.19.0 -d .gpu-wheels && ls .gpu-wheels
  exit
fi
out=${OUT:-/tmp/tailjax-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TAILJAX_COMPILE_CACHE=off
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | tail -2
fi
python3 -c "import jax; print('devices:', jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
start=$SECONDS
step() {  # name, seconds, command...: runs it under a limit, keeps its log, prints its last lines
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 14 "$out/$name.log"
  [ $rc -eq 0 ] || echo "!! $name exited $rc (124: over its limit); full log in $out/$name.log"
}
step precision 60 python3 -m pytest -q -p no:cacheprovider tests/test_runtime.py -k bfloat16_inputs tests/test_head.py
step head 70 python3 benchmarks/head.py --preset h100
step plan 45 python3 benchmarks/eval.py --preset h100 --plan
step eval 150 python3 benchmarks/eval.py --preset h100
step attention 45 python3 benchmarks/attention.py
step distill 70 python3 benchmarks/distill.py --repeats 3
echo "== done in $((SECONDS - start))s"

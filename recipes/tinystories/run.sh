#!/usr/bin/env bash
# The paper's TinyStories family on one accelerator host (see teacher.yaml for the data):
# the token-CE teacher, its two learning-rate controls, students by full KL and top-40/15/5 KL
# from one cached top-40, then selection by median CE with concordance per family.
#   recipes/tinystories/run.sh [OUTPUT_DIR]          (default runs/tinystories)
# The paper's "Small" controls (runs 8-10) are left out: their shape is not in our copy of the paper.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-runs/tinystories}

tailjax distill --config "$here/teacher.yaml" --output "$out/token-ce"
for lr in 1e-3 1e-4; do
  tailjax distill --config "$here/teacher.yaml" --learning-rate "$lr" --output "$out/token-ce-lr$lr"
done
teacher=$out/token-ce/checkpoints/250000
tailjax cache-teacher --config "$here/student.yaml" --teacher "$teacher" --topk 40 --logprob-dtype float16 \
  --output "$out/teacher-top40"
tailjax distill --config "$here/student.yaml" --teacher "$teacher" --objective kl --output "$out/full-kl"
for k in 40 15 5; do
  tailjax distill --config "$here/student.yaml" --teacher "$teacher" --teacher-cache "$out/teacher-top40" \
    --topk "$k" --output "$out/top$k"
done
tailjax select "$out/token-ce" "$out/full-kl" "$out/top40" "$out/top15" "$out/top5" --output "$out/selection-distilled"
tailjax select "$out/token-ce" "$out/token-ce-lr1e-3" "$out/token-ce-lr1e-4" --output "$out/selection-controls"

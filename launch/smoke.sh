#!/usr/bin/env bash
# The README's first command at a smoke size: the embedded default's training program
# (configs/demo.py) shrunk by command-line overrides to one step of one question × 2 rollouts and
# a validation of 2 questions (~1.5 minutes on 2 CPU cores). Exits non-zero unless it ran and wrote
# its metrics lines. CI runs it in a venv made by `bash launch/install.sh` alone (no torch, no test
# packages), so a runtime dependency that only the test install brings fails CI.
#   bash launch/smoke.sh [RUN_DIR]       (default: a new temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="${1:-$(mktemp -d)/smoke}"
mkdir -p "$run_dir"
python3 -m igpo_jax.train --config=configs/demo.py --config.run_dir="$run_dir" --config.trainer.progress=False \
  --config.trainer.total_training_steps=1 --config.data.train_batch_size=1 --config.rollout.n=2 \
  --config.data.val_max_questions=2 --config.data.val_batch_size=2 --config.rollout.max_new_tokens=8 \
  --config.actor.ppo_mini_batch_size=2 --config.actor.micro_batch_size=2 \
  --config.trainer.test_freq=1 --config.trainer.save_freq=1 | tee "$run_dir/stdout.log"
grep -q "python -m igpo_jax.report $run_dir" "$run_dir/stdout.log" || {  # it ends saying where to look
  echo "smoke: the run did not end with its next steps" >&2; exit 1; }
python3 - "$run_dir/metrics.jsonl" <<'PY'
import json, sys
steps = {r["step"]: r for r in map(json.loads, open(sys.argv[1]))}
assert "val/no_format_f1" in steps.get(0, {}), f"no step-0 validation line in {sys.argv[1]}"
assert "reward/mean" in steps.get(1, {}) and "actor/grad_norm" in steps[1], f"no step-1 metrics in {sys.argv[1]}"
print(f"smoke: ok, metrics of steps {sorted(steps)} in {sys.argv[1]}")
PY

#!/usr/bin/env bash
# Regenerate reports/evaluation (tables.md, results.json, figures/):
#   bash reports/evaluation/regenerate.sh
# 1. trains configs/default.toml (3000-step schedule, a checkpoint every 500 steps, one thread), then
# 2. evaluates the checkpoint after STEP steps (default 1500: the committed report, 71 min of training on one
#    thread of a shared 2-core CPU) on test scenes 0..N-1 at nominal SNR 10 and 20 dB (N=48: 10 min).
# CHECKPOINT=path/to/file.pt skips the training and evaluates that checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-runs/evaluation/default}
N=${N:-48}
STEP=${STEP:-1500}
if [ -z "${CHECKPOINT:-}" ]; then
  python -m ris_model train --config configs/default.toml --out "$RUN"
  CHECKPOINT=$(printf '%s/checkpoints/step_%06d.pt' "$RUN" "$STEP")
  [ "$STEP" -ge 3000 ] && CHECKPOINT="$RUN/checkpoints/last.pt"
fi
python -m ris_model evalreport --checkpoint "$CHECKPOINT" --out reports/evaluation --n "$N" --snr 10 20

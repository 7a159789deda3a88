#!/usr/bin/env bash
# Regenerate reports/evaluation (tables.md, results.json, figures/) from scratch:
#   bash reports/evaluation/regenerate.sh
# 1. trains configs/default.toml (3000 steps; 74 min on one thread of a shared 2-core CPU), then
# 2. evaluates its last checkpoint on test scenes 0..N-1 at nominal SNR 0, 10, 20 dB (N=96: about 15 min).
# Set CHECKPOINT=path/to/last.pt to skip the training and evaluate an existing checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-runs/evaluation/default}
N=${N:-96}
if [ -z "${CHECKPOINT:-}" ]; then
  python -m ris_model train --config configs/default.toml --out "$RUN"
  CHECKPOINT="$RUN/checkpoints/last.pt"
fi
python -m ris_model evalreport --checkpoint "$CHECKPOINT" --out reports/evaluation --n "$N" --snr 0 10 20

#!/usr/bin/env bash
# Regenerate reports/evaluation (tables.md, results.json, figures/) from the committed checkpoint:
#   bash reports/evaluation/regenerate.sh
# It runs `python -m ris_model benchmark` on configs/default.toml: the threshold tuning on 100 validation scenes
# per SNR, then N (default 500) test scenes per nominal SNR 0, 10, 20, 30 dB with ML, MUSIC and the learned
# detector (reports/evaluation/detector.pt). Results of each condition are cached under runs/benchmark (the
# learned rows separately, keyed by the checkpoint's hash), so an interrupted run resumes and a new checkpoint
# does not recompute the baselines; JOBS=2 computes the conditions in two processes (one thread each) first.
# Re-train the checkpoint (deterministic, one thread; see reports/evaluation/tables.md for the time it took):
#   python -m ris_model traindet --config configs/default.toml --out reports/evaluation/detector.pt
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-500}
VAL=${VAL:-100}
JOBS=${JOBS:-1}
CKPT=${CKPT:-reports/evaluation/detector.pt}
OUT=${OUT:-reports/evaluation}
ARGS=(--config configs/default.toml --n "$N" --val "$VAL" --snr 0 10 20 30 --cache runs/benchmark)
if [ "$JOBS" -gt 1 ]; then
  python -m ris_model benchmark "${ARGS[@]}" --only 0 --out runs/benchmark/partial  # tunes the threshold first
  python -m ris_model benchmark "${ARGS[@]}" --only 10 --out runs/benchmark/partial &
  python -m ris_model benchmark "${ARGS[@]}" --only 20 30 --out runs/benchmark/partial
  wait
fi
python -m ris_model benchmark "${ARGS[@]}" --learned "$CKPT" --out "$OUT"

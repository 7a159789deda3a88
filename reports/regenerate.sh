#!/usr/bin/env bash
# Regenerate the committed reports of the shipped configs (about 10 minutes on a 2-core CPU):
#   bash reports/regenerate.sh
# Run folders (traces, capsules) go to runs/reports/ (ignored by git); only report.md + figures land here.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/reports}
rm -rf "$RUNS"
mkdir -p "$RUNS"

trace() {  # trace NAME ARGS...: exit code 1 (non-finite steps) is an expected outcome for the seeded faults
  local name=$1; shift
  risdiag trace --no-live --no-report --out "$RUNS/$name" "$@" || [ $? -eq 1 ]
}
report() { risdiag report "$RUNS/$1" --out "reports/$1/report.md"; }

trace quickstart --config configs/quickstart.toml
trace seed-misaligned --config configs/seed-misaligned.toml
trace seed-nan --config configs/seed-nan.toml --steps 150
risdiag bisect "$RUNS/seed-nan" --float64 > "$RUNS/seed-nan/bisect.txt"  # writes finding.json for the report
trace seed-nan-gap-aware --config configs/seed-nan.toml --steps 150 --set loss.eigh_backward=gap_aware

for name in quickstart seed-misaligned seed-nan seed-nan-gap-aware; do report "$name"; done
risdiag compare "$RUNS/seed-nan" "$RUNS/seed-nan-gap-aware" --labels torch gap_aware \
  --out reports/compare-seed-nan-torch-vs-gap-aware
risdiag compare "$RUNS/quickstart" "$RUNS/seed-misaligned" --labels aligned misaligned \
  --out reports/compare-aligned-vs-misaligned

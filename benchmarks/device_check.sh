#!/usr/bin/env bash
# CUDA / AMP check of the traced pipeline (run on a GPU machine from the repo root):
#   bash benchmarks/device_check.sh OUT_DIR
# 1) seed-nan on CUDA: non-finite steps recorded, capsule replayed and located on the GPU;
# 2) quickstart on CUDA with bf16 AMP: clean; 3) monitor overhead on CUDA (off / every step / every 10).
set -uo pipefail
OUT=${1:-/tmp/device-check}
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python -m ris_stability.cli trace --config configs/seed-nan.toml --steps 3 --set train.device=cuda \
  --set train.val_every=0 --out "$OUT/seed-nan" --no-live --no-report > "$OUT/seed-nan.log" 2>&1
echo "seed-nan on cuda: exit $? (1 expected)"; grep -E "non-finite steps" "$OUT/seed-nan.log"
python -m ris_stability.cli bisect "$OUT/seed-nan" --json > "$OUT/bisect.json" 2> "$OUT/bisect.err"
echo "bisect: exit $?"; python -c "import json; d=json.load(open('$OUT/bisect.json')); f=d['finding']; print(d['reproduced'], d['bit_exact'], f['phase'], f['node'], f['module'], f['cause'])"
python -m ris_stability.cli trace --config configs/quickstart.toml --steps 40 --set train.device=cuda \
  --set train.amp=true --set train.val_every=0 --out "$OUT/quick-amp" --no-live --no-report > "$OUT/quick.log" 2>&1
echo "quickstart cuda+bf16: exit $? (0 expected)"; grep -E "non-finite steps|loss first" "$OUT/quick.log"
# Monitor overhead on CUDA: quickstart (goal <= 1.05x every step) and the outside models on the GPU.
python benchmarks/monitor_overhead.py --steps 15 --rounds 3 --configs quickstart.toml --set train.device=cuda \
  --model gpt whiten persample --device cuda

#!/usr/bin/env bash
# Full-width CIFAR-10 (+ auxiliary task) on one GPU; prints the summary and the per-epoch log.
# Usage: MTLVISION_DATA=/path/to/data bash benchmarks/gpu_cifar10.sh [extra --set overrides...]
#        DRY_RUN=1 bash benchmarks/gpu_cifar10.sh [...]   checks the config and command (no GPU, no data needed)
set -euo pipefail
out=${RUN_DIR:-/tmp/mtlvision-gpu-cifar10}
cmd=(python -m mtlvision train configs/cifar10_gpu.yaml --out "$out" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  { printf '%q ' "${cmd[@]}"; echo; } | python benchmarks/_smoke.py
  exit
fi
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_cifar10.sh: needs a CUDA GPU (torch.cuda.is_available() is False here); DRY_RUN=1 checks the" \
       "config and command without one" >&2
  exit 2
fi
rm -rf "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
start=$(date +%s.%N)
"${cmd[@]}"
end=$(date +%s.%N)
python - "$out" "$start" "$end" <<'PY'
import json, sys
run, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = json.load(open(f"{run}/summary.json"))
print(json.dumps({"test_accuracy": {t: m["test"]["accuracy"] for t, m in s["tasks"].items()},
                  "best_epoch": s["best_epoch"], "train_wall_time_s": s["wall_time_s"],
                  "train_images_per_s": s["train_images_per_s"], "process_wall_s": round(end - start, 1)}, indent=1))
PY

#!/usr/bin/env bash
# Full-width CIFAR-10 (+ auxiliary task) on one GPU; prints the summary and the per-epoch log.
# Usage: MTLVISION_DATA=/path/to/data bash benchmarks/gpu_cifar10.sh [extra --set overrides...]
set -euo pipefail
out=${RUN_DIR:-/tmp/mtlvision-gpu-cifar10}
rm -rf "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
start=$(date +%s.%N)
python -m mtlvision train configs/cifar10_gpu.yaml --out "$out" "$@"
end=$(date +%s.%N)
python - "$out" "$start" "$end" <<'PY'
import json, sys
run, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = json.load(open(f"{run}/summary.json"))
print(json.dumps({"test_accuracy": {t: m["test"]["accuracy"] for t, m in s["tasks"].items()},
                  "best_epoch": s["best_epoch"], "train_wall_time_s": s["wall_time_s"],
                  "train_images_per_s": s["train_images_per_s"], "process_wall_s": round(end - start, 1)}, indent=1))
PY

#!/usr/bin/env bash
# Every balancing method on Multi-MNIST with the same budget (configs/multimnist.yaml, EPOCHS epochs each),
# then a table of test accuracy per task and training time. Finished runs are kept and skipped.
# Usage: [EPOCHS=2] [OUT=runs/methods-multimnist] bash benchmarks/methods_multimnist.sh [method ...]
#        DRY_RUN=1 bash benchmarks/methods_multimnist.sh [method ...]   checks every run's config, trains nothing
set -euo pipefail
epochs=${EPOCHS:-2}
out=${OUT:-runs/methods-multimnist}
methods=("$@")
[ ${#methods[@]} -gt 0 ] || mapfile -t methods < <(python -c "from mtlvision.balancing import METHODS; print('\n'.join(METHODS.names()))")
[ ${#methods[@]} -gt 0 ] || { echo "methods_multimnist.sh: no balancing methods found (is mtlvision importable?)" >&2; exit 2; }
if [[ ${DRY_RUN:-0} == 1 ]]; then
  for m in "${methods[@]}"; do
    printf '%q ' python -m mtlvision train configs/multimnist.yaml --quiet --out "$out/$m" \
      --set train.epochs="$epochs" --set balancing.method="$m"
    echo
  done | python benchmarks/_smoke.py
  exit
fi
for m in "${methods[@]}"; do
  [ -f "$out/$m/summary.json" ] && continue
  resume=(); [ -f "$out/$m/checkpoint.pt" ] && resume=(--resume "$out/$m")
  python -m mtlvision train configs/multimnist.yaml --quiet --out "$out/$m" "${resume[@]}" \
    --set train.epochs="$epochs" --set balancing.method="$m" > /dev/null
done
python - "$out" "${methods[@]}" <<'PY'
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
print(f"{'method':12} {'left':>7} {'right':>7} {'s/epoch':>8}")
for m in methods:
    s = json.load(open(f"{out}/{m}/summary.json"))
    acc = {t: 100 * v["test"]["accuracy"] for t, v in s["tasks"].items()}
    print(f"{m:12} {acc['left']:7.2f} {acc['right']:7.2f} {s['wall_time_s'] / s['epochs']:8.1f}")
PY

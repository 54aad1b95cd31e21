#!/usr/bin/env bash
# Where do mtlvision and the canonical torchvision pipeline part on CIFAR-10 (one GPU, accuracy only)?
# Runs side by side on one GPU: the reference as is, the reference with each of mtlvision's recipe
# choices, with all of them, and mtlvision's single-task hps run; prints one line per run.
# Usage: MTLVISION_DATA=/path/to/data bash benchmarks/gpu_reference_ab.sh [epochs, default 30]
# REF_ARGS / MTL_ARGS add arguments to every reference run / to the mtlvision run (e.g. a smaller width).
set -uo pipefail
epochs=${1:-30}
data=${MTLVISION_DATA:-../shared/data}/cifar10
tmp=$(mktemp -d)
declare -A variants=(
  [reference]="" [held_out_2500]="--limit 47500" [no_decay_norms]="--no-decay-norms"
  [momentum_0.9]="--max-momentum 0.9" [mtlvision_init]="--mtlvision-init"
  [all_four]="--limit 47500 --no-decay-norms --max-momentum 0.9 --mtlvision-init")
for name in "${!variants[@]}"; do
  # shellcheck disable=SC2086
  python benchmarks/cifar10_reference.py --data "$data" --epochs "$epochs" --workers 2 ${variants[$name]} ${REF_ARGS:-} \
    > "$tmp/$name.json" 2> "$tmp/$name.err" &
done
python -m mtlvision train configs/cifar10_gpu.yaml --quiet --out "$tmp/mtlvision" --set train.epochs="$epochs" \
  --set 'model.architecture={name: hps}' --set tasks.vehicle.enabled=false --set train.deterministic=false ${MTL_ARGS:-} \
  > "$tmp/mtlvision.log" 2>&1 &
wait
for name in "${!variants[@]}"; do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:<16} {100*r[\"test_accuracy\"]:.2f}%')" \
    "$tmp/$name.json" "$name" || tail -n 3 "$tmp/$name.err"
done
python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f'mtlvision_hps    {100*s[\"tasks\"][\"class\"][\"test\"][\"accuracy\"]:.2f}%')" \
  "$tmp/mtlvision/summary.json" || tail -n 5 "$tmp/mtlvision.log"
rm -rf "$tmp"

#!/usr/bin/env bash
# Where do mtlvision and the canonical torchvision pipeline part on CIFAR-10 (accuracy only)?
# Runs the reference (benchmarks/cifar10_reference.py) as is, with each of mtlvision's recipe choices,
# with all of them, and mtlvision's single-task hps run with the same recipe, as configured and with the
# reference's initialisation; prints one line per run.
# Usage: MTLVISION_DATA=/path/to/data bash benchmarks/reference_ab.sh [epochs, default 30]
#          one GPU: full width, bf16, every run side by side (about 5 min on an H200)
#        CPU=1 bash benchmarks/reference_ab.sh 5
#          CPU: ResNet-18 width 0.25, fp32, one run at a time (2 cores: 7 min per mtlvision run, 13 per reference run)
# VARIANTS="reference all_four" picks reference variants (default: all six; none: only mtlvision's runs);
# REF_ARGS / MTL_ARGS add arguments to every reference run / to both mtlvision runs (e.g. --seed 1 / --set seed=1).
# DRY_RUN=1 checks every command's arguments and configs (prints JSON) and runs nothing.
set -uo pipefail
epochs=${1:-30}
data=${MTLVISION_DATA:-../shared/data}/cifar10
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
variants=${VARIANTS:-reference held_out_2500 no_decay_norms momentum_0.9 mtlvision_init all_four}
ref_args=(--data "$data" --epochs "$epochs" --workers 2)
mtl_args=(--set train.epochs="$epochs" --set 'model.architecture={name: hps}' --set tasks.vehicle.enabled=false
          --set train.deterministic=false)
if [[ ${CPU:-0} == 1 ]]; then
  ref_args+=(--device cpu --width 0.25)
  mtl_args+=(--set model.backbone.width=0.25 --set train.device=cpu --set train.precision=fp32)
fi
start() {  # on a GPU every run starts at once; on the CPU each waits for the one before
  if [[ ${DRY_RUN:-0} == 1 ]]; then { printf '%q ' "$@"; echo; } >> "$tmp/commands"
  elif [[ ${CPU:-0} == 1 ]]; then "$@"; else "$@" & fi
}
ran=()
for name in $variants; do
  case $name in
    none) continue ;;
    reference) extra=() ;;
    held_out_2500) extra=(--limit 47500) ;;
    no_decay_norms) extra=(--no-decay-norms) ;;
    momentum_0.9) extra=(--max-momentum 0.9) ;;
    mtlvision_init) extra=(--mtlvision-init) ;;
    all_four) extra=(--limit 47500 --no-decay-norms --max-momentum 0.9 --mtlvision-init) ;;
    *) echo "unknown variant '$name' (none reference held_out_2500 no_decay_norms momentum_0.9 mtlvision_init all_four)" >&2
       exit 2 ;;
  esac
  # shellcheck disable=SC2086
  start python benchmarks/cifar10_reference.py "${ref_args[@]}" "${extra[@]}" ${REF_ARGS:-} \
    > "$tmp/$name.json" 2> "$tmp/$name.err"
  ran+=("$name")
done
# mtlvision as configured, and with the reference's initialisation (PyTorch's per-layer default, no zero-init)
# shellcheck disable=SC2086
start python -m mtlvision train configs/cifar10_gpu.yaml --quiet --out "$tmp/mtlvision_hps" "${mtl_args[@]}" \
  ${MTL_ARGS:-} > "$tmp/mtlvision_hps.log" 2>&1
# shellcheck disable=SC2086
start python -m mtlvision train configs/cifar10_gpu.yaml --quiet --out "$tmp/mtlvision_pt_init" "${mtl_args[@]}" \
  --set model.backbone.init=pytorch --set model.backbone.zero_init_residual=false ${MTL_ARGS:-} \
  > "$tmp/mtlvision_pt_init.log" 2>&1
if [[ ${DRY_RUN:-0} == 1 ]]; then
  python benchmarks/_smoke.py < "$tmp/commands"
  exit
fi
wait
for name in "${ran[@]}"; do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:<18} {100*r[\"test_accuracy\"]:.2f}%')" \
    "$tmp/$name.json" "$name" 2>/dev/null || { echo "$name failed:"; tail -n 3 "$tmp/$name.err"; }
done
for name in mtlvision_hps mtlvision_pt_init; do
  python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:<18} {100*s[\"tasks\"][\"class\"][\"test\"][\"accuracy\"]:.2f}%')" \
    "$tmp/$name/summary.json" "$name" 2>/dev/null || { echo "$name failed:"; tail -n 5 "$tmp/$name.log"; }
done

#!/usr/bin/env bash
# CIFAR-10 reproduction on a CPU-sized configuration (docs/results.md, "CIFAR-10").
# Usage: benchmarks/reproduce_cifar10.sh [train|attack|all]   (env: DATA, RUNS, WIDTH, *_EPOCHS, IMAGES, BOUNDARY_*)
# Data: the JPEG copy of CIFAR-10 in ../shared/data (DATA to override). Runs go to runs/c10.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
DATASET=${DATASET:-imagefolder}  # digits: a quick smoke run of this script
if [ "$DATASET" = digits ]; then DATA_ARGS=(--dataset digits); else DATA_ARGS=(--dataset "$DATASET" --data-dir "$DATA"); fi
RUNS=${RUNS:-runs/c10}
TARGET_EPOCHS=${TARGET_EPOCHS:-6}
SURROGATE_EPOCHS=${SURROGATE_EPOCHS:-4}
WIDTH=${WIDTH:-0.25}
STAGE=${1:-all}
mkdir -p "$RUNS"
train() {  # name, then defcnn train flags
  local name=$1; shift
  if [ -f "$RUNS/$name/model.safetensors" ]; then echo "skip $name (done)"; return; fi
  defcnn train "${DATA_ARGS[@]}" --width "$WIDTH" --out "$RUNS/$name" "$@"
}
if [ "$STAGE" = train ] || [ "$STAGE" = all ]; then
  # targets: the paper's standard and defective (keep 0.1) ResNet-18, same seed
  train std    --arch resnet18 --epochs "$TARGET_EPOCHS" --seed 0
  train def    --arch resnet18 --epochs "$TARGET_EPOCHS" --seed 0 --defective --keep-prob 0.1
  # surrogates: standard models the targets never saw
  train sur-resnet18 --arch resnet18 --epochs "$SURROGATE_EPOCHS" --seed 1
  train sur-vgg19    --arch vgg19    --epochs "$SURROGATE_EPOCHS" --seed 2
  train sur-densenet121 --arch densenet121 --epochs "$SURROGATE_EPOCHS" --seed 3
fi
if [ "$STAGE" = attack ] || [ "$STAGE" = all ]; then
  IMAGES=${IMAGES:-1000}; BOUNDARY_IMAGES=${BOUNDARY_IMAGES:-25}; BOUNDARY_BUDGET=${BOUNDARY_BUDGET:-5000}
  for pair in std:standard def:defective; do
    run=${pair%%:*}; name=${pair##*:}
    [ -f "$RUNS/repo/$name/1/model.onnx" ] || defcnn export "$RUNS/$run/model.safetensors" \
      --repo "$RUNS/repo" --name "$name" --version 1 "${DATA_ARGS[@]}"
  done
  # patch shuffling and Gaussian noise on the whole test split (local PyTorch, no server needed)
  defcnn evaluate "$RUNS/std/model.safetensors" "$RUNS/def/model.safetensors" \
    "${DATA_ARGS[@]}" --patch-shuffle 2 4 8 --noise 0.02 0.05 0.1 \
    --out "$RUNS/corruptions.json"
  log="$RUNS/server.log"; ready="$RUNS/server.ready.json"
  rm -f "$ready"
  defcnn serve --model-repo "$RUNS/repo" --port 0 --metrics-port -1 --log-level WARNING \
    --ready-file "$ready" >"$log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
  until [ -f "$ready" ]; do
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }; sleep 0.5
  done
  url=$(python -c 'import json, sys; d = json.load(open(sys.argv[1])); print("%s:%d" % (d["host"], d["port"]))' "$ready")
  echo "server on $url"
  for sur in resnet18 vgg19 densenet121; do
    defcnn attack transfer --url "$url" --model standard --model defective \
      --surrogate "$RUNS/sur-$sur/model.safetensors" "${DATA_ARGS[@]}" \
      --attack fgsm pgd mifgsm --eps 8 16 32 --num-images "$IMAGES" --seed 0 \
      --out "$RUNS/transfer-$sur"
  done
  defcnn attack query --url "$url" --model standard --model defective --attack boundary \
    --budget "$BOUNDARY_BUDGET" "${DATA_ARGS[@]}" \
    --num-images "$BOUNDARY_IMAGES" --seed 0 --out "$RUNS/boundary"
fi

#!/usr/bin/env bash
# CIFAR-10 reproduction on a CPU-sized configuration (docs/results.md, "CIFAR-10").
# Usage: benchmarks/reproduce_cifar10.sh [train|serve-and-attack|all]
# Data: the JPEG copy of CIFAR-10 in ../shared/data (DATA to override). Runs go to runs/c10.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
RUNS=${RUNS:-runs/c10}
TARGET_EPOCHS=${TARGET_EPOCHS:-6}
SURROGATE_EPOCHS=${SURROGATE_EPOCHS:-4}
WIDTH=${WIDTH:-0.25}
STAGE=${1:-all}
mkdir -p "$RUNS"
train() {  # name, then defcnn train flags
  local name=$1; shift
  if [ -f "$RUNS/$name/model.safetensors" ]; then echo "skip $name (done)"; return; fi
  defcnn train --dataset imagefolder --data-dir "$DATA" --width "$WIDTH" --out "$RUNS/$name" "$@"
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

#!/usr/bin/env bash
# CIFAR-10 evaluation of the paper's claims on a CPU-sized configuration (docs/results.md).
# Usage: benchmarks/reproduce_cifar10.sh [train|attack|all]
#   env: DATA, RUNS, WIDTH, SEEDS ("0 1 2"), TARGET_EPOCHS, SURROGATE_EPOCHS, SURROGATES,
#        IMAGES, QUERY_IMAGES, QUERY_BUDGET, QUERY_ATTACKS, QUERY_SEEDS, QUERY_ROLES
# Per target seed S: std-sS and def-sS (same seed, same schedule) and ctl-sS, the standard
# model stopped at def-sS's clean accuracy (the accuracy-matched control). Surrogates are
# standard models with seeds no target has. Runs go to runs/c10; a rerun keeps what is done
# with the same settings and refuses what was done with others.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
DATASET=${DATASET:-imagefolder}  # digits: a quick smoke run of this script
if [ "$DATASET" = digits ]; then DATA_ARGS=(--dataset digits); else DATA_ARGS=(--dataset "$DATASET" --data-dir "$DATA"); fi
RUNS=${RUNS:-runs/c10}
SEEDS=${SEEDS:-"0 1 2"}
TARGET_EPOCHS=${TARGET_EPOCHS:-12}
SURROGATE_EPOCHS=${SURROGATE_EPOCHS:-6}
SURROGATES=${SURROGATES:-resnet18}
WIDTH=${WIDTH:-0.25}
STAGE=${1:-all}
mkdir -p "$RUNS"
train() {  # name, then defcnn train flags; a finished run of the same settings is kept as
  # it is, an unfinished one resumes, and one made with other settings is refused
  local name=$1; shift
  echo "train $name: $*"
  defcnn train "${DATA_ARGS[@]}" --width "$WIDTH" --schedule fast --out "$RUNS/$name" --resume "$@"
}
accuracy() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["test_accuracy"])' "$1"; }
if [ "$STAGE" = train ] || [ "$STAGE" = all ]; then
  for s in $SEEDS; do
    train "def-s$s" --arch resnet18 --epochs "$TARGET_EPOCHS" --seed "$s" --defective --keep-prob 0.1
    train "std-s$s" --arch resnet18 --epochs "$TARGET_EPOCHS" --seed "$s"
    # the control: std-sS's own run, stopped at the first check within 1 point of def-sS's
    # accuracy (checks every tenth of an epoch, 8x as often once within 5 points); a control
    # made for another target is refused (its settings differ)
    stop=$(accuracy "$RUNS/def-s$s/metrics.json")
    every=$(python3 -c 'import json, math, sys; m = json.load(open(sys.argv[1])); print(max(1, m["history"][0]["step"] // 10))' "$RUNS/def-s$s/metrics.json")
    train "ctl-s$s" --arch resnet18 --epochs "$TARGET_EPOCHS" --seed "$s" --stop-at-accuracy "$stop" \
      --stop-within 0.01 --eval-every "$every"
  done
  k=100
  for sur in $SURROGATES; do
    train "sur-$sur" --arch "$sur" --epochs "$SURROGATE_EPOCHS" --seed "$k"; k=$((k + 1))
  done
fi
if [ "$STAGE" = attack ] || [ "$STAGE" = all ]; then
  # QUERY_IMAGES: sampled; only those a target gets right are attacked (>= 50 at ~75% accuracy)
  if [ "$DATASET" = digits ]; then IMAGES=${IMAGES:-300}; fi  # digits: 359 test images
  IMAGES=${IMAGES:-1000}; QUERY_IMAGES=${QUERY_IMAGES:-80}; QUERY_BUDGET=${QUERY_BUDGET:-10000}
  QUERY_ATTACKS=${QUERY_ATTACKS:-"boundary hopskipjump"}; QUERY_SEEDS=${QUERY_SEEDS:-0}
  QUERY_ROLES=${QUERY_ROLES:-"standard defective control"}
  query_names=()
  for s in $SEEDS; do
    for pair in std:standard def:defective ctl:control; do
      run=${pair%%:*}-s$s; name=${pair##*:}-s$s
      onnx="$RUNS/repo/$name/1/model.onnx"
      if [ -f "$onnx" ]; then  # an export is reused only for the checkpoint it was made from
        python3 -c 'import sys, onnx
from defcnn.digest import sha256_file
from defcnn.export.onnx_graph import read_metadata
meta = read_metadata(onnx.load(sys.argv[1], load_external_data=False))
sys.exit(meta.get("source_checkpoint_sha256") != sha256_file(sys.argv[2]))' "$onnx" "$RUNS/$run/model.safetensors" \
          || { echo "$RUNS/repo/$name was exported from another checkpoint; remove it" >&2; exit 2; }
      else
        defcnn export "$RUNS/$run/model.safetensors" --repo "$RUNS/repo" --name "$name" \
          --version 1 "${DATA_ARGS[@]}"
      fi
      case " $QUERY_SEEDS " in *" $s "*)
        case " $QUERY_ROLES " in *" ${pair##*:} "*) query_names+=("$name");; esac;; esac
    done
    # patch shuffling and Gaussian noise on the whole test split (in-process PyTorch); a
    # result is reused only for the checkpoints it was computed from
    corr="$RUNS/corruptions-s$s.json"
    ckpts=("$RUNS/std-s$s/model.safetensors" "$RUNS/def-s$s/model.safetensors" "$RUNS/ctl-s$s/model.safetensors")
    if [ -f "$corr" ]; then
      python3 -c 'import json, sys
from defcnn.digest import sha256_file
saved = json.load(open(sys.argv[1])).get("checkpoint_sha256", {})
sys.exit(sorted(saved.values()) != sorted(sha256_file(p) for p in sys.argv[2:]))' "$corr" "${ckpts[@]}" \
        || { echo "$corr was computed from other checkpoints; remove it" >&2; exit 2; }
    else
      defcnn evaluate "${ckpts[@]}" "${DATA_ARGS[@]}" --patch-shuffle 2 4 8 \
        --noise 0.02 0.05 0.1 --out "$corr"
    fi
  done
  log="$RUNS/server.log"; ready="$RUNS/server.ready.json"
  rm -f "$ready"
  defcnn serve --model-repo "$RUNS/repo" --port 0 --metrics-port -1 --log-level WARNING \
    --ready-file "$ready" >"$log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
  until [ -f "$ready" ]; do
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }; sleep 0.5
  done
  url=$(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print("%s:%d" % (d["host"], d["port"]))' "$ready")
  echo "server on $url"
  # one run per surrogate and target seed, in $RUNS/transfer-SUR-sS (the claims script
  # merges a surrogate's runs); a finished run with the same settings is reused, one with
  # other settings is refused
  for sur in $SURROGATES; do
    for s in $SEEDS; do
      defcnn attack transfer --url "$url" --model "standard-s$s" --model "defective-s$s" \
        --model "control-s$s" --surrogate "$RUNS/sur-$sur/model.safetensors" "${DATA_ARGS[@]}" \
        --attack fgsm pgd mifgsm --eps 8 16 32 --num-images "$IMAGES" --seed 0 \
        --out "$RUNS/transfer-$sur-s$s"
    done
  done
  # one run per set of models not yet attacked, in $RUNS/ATTACK-NAME+NAME...; the claims
  # script merges these folders
  for attack in $QUERY_ATTACKS; do
    todo=$(python3 -c '
import json, pathlib, sys
runs, attack, names = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
done = set()
for f in runs.glob(attack + "-*/results.json"):
    done |= set(json.loads(f.read_text())["models"])
print(" ".join(n for n in names if n not in done))' "$RUNS" "$attack" "${query_names[@]}")
    [ -n "$todo" ] || { echo "skip $attack (done)"; continue; }
    args=(); for n in $todo; do args+=(--model "$n"); done
    defcnn attack query --url "$url" "${args[@]}" --attack "$attack" \
      --budget "$QUERY_BUDGET" "${DATA_ARGS[@]}" \
      --num-images "$QUERY_IMAGES" --seed 0 --out "$RUNS/$attack-${todo// /+}"
  done
fi

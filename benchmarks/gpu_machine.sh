#!/usr/bin/env bash
# benchmarks/gpu_evidence.py on a GPU machine that cannot install anything (this workplace's
# H200: no network, its own python3 with torch 2.11 + CUDA 13, onnx, CPU-only onnxruntime).
# The project runs from its source folders there; what the image lacks travels in .gpu/
# (ignored by git), made here by `prepare`:
#
#   benchmarks/gpu_machine.sh prepare             # here: wheels, onnxruntime-gpu in parts, data
#   OUT=/some/dir benchmarks/gpu_machine.sh run   # there: install from .gpu/, run, report to OUT
#
# One transfer carries 64 MiB with the working tree (about 6 MB): carry .gpu/wheels,
# .gpu/cifar10-jpeg.tar.gz, .gpu/ort/NAME and .gpu/ort/SHA256SUMS in a first call, then one
# part of the onnxruntime-gpu wheel (255.6 MB, five parts of at most 50 MiB) per call, calls
# back to back so the machine stays warm and keeps what earlier calls left; the last call
# carries the last part and runs `run`, which checks each part and the joined wheel.
# Only the report and the plots go to OUT; training runs and the repository stay in /tmp.
# DEVICE=cpu rehearses the same run on a machine without a GPU; EPOCHS shortens it.
#
# Not yet run on a GPU machine (no GPU was lent to the session that wrote it).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu
# The image's grpcio and protobuf may be older than the generated protocol modules need
# (protos/defcnn/protos), and it has no grpc health or reflection packages.
SMALL_WHEELS=(grpcio==1.85.3 protobuf==6.33.6 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1)

case "${1:-}" in
prepare)
    if [ -d .git/info ]; then
        grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >>.git/info/exclude
    else
        echo "not a plain git checkout: make sure git ignores $KIT/" >&2
    fi
    rm -rf "$KIT/ort" && mkdir -p "$KIT/wheels" "$KIT/ort"
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$KIT/wheels" "${SMALL_WHEELS[@]}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$KIT/ort" onnxruntime-gpu==1.31.1
    (
        cd "$KIT/ort"
        wheel=$(ls onnxruntime_gpu-*.whl)
        echo "$wheel" >NAME
        split -b 50M "$wheel" part-
        { sha256sum part-*; sha256sum "$wheel"; } >SHA256SUMS
        rm "$wheel"
    )
    cp ../shared/data/cifar10-jpeg.tar.gz "$KIT/"
    du -sh "$KIT"/* "$KIT"/ort/*
    ;;
run)
    : "${OUT:?set OUT to the folder the report goes to}"
    wheel=$(cat "$KIT/ort/NAME")
    (
        cd "$KIT/ort"
        # the parts SHA256SUMS lists, in its order: a stray file is never joined in
        parts=$(awk '$2 ~ /^part-/ {print $2}' SHA256SUMS)
        grep ' part-' SHA256SUMS | sha256sum -c --quiet
        # shellcheck disable=SC2086  # the part names have no spaces
        cat $parts >"/tmp/$wheel"
        grep " $wheel\$" SHA256SUMS | (cd /tmp && sha256sum -c --quiet)
    )
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$KIT"/wheels/*.whl "/tmp/$wheel"
    export PYTHONPATH=/tmp/site:core:export:server:protos:client:app
    # ONNX Runtime's CUDA provider finds cuBLAS, cuDNN, cuRAND and cudart in torch's nvidia
    # wheels only through the loader's path.
    nvidia=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')
    if [ -d "$nvidia" ]; then
        LD_LIBRARY_PATH="$(find "$nvidia" -maxdepth 2 -type d -name lib | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
    else
        echo "no $nvidia: the CUDA libraries must already be on the loader's path" >&2
    fi
    work=$(mktemp -d /tmp/defcnn-evidence-XXXXXX)
    python3 benchmarks/gpu_evidence.py --device "${DEVICE:-cuda}" --dataset imagefolder \
        --data-dir "$KIT/cifar10-jpeg.tar.gz" --out "$OUT/evidence" --work "$work" \
        ${EPOCHS:+--epochs "$EPOCHS"}
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac

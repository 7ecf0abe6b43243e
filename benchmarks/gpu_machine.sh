#!/usr/bin/env bash
# benchmarks/gpu_evidence.py on a GPU machine that cannot install anything (this workplace's
# H200: no network, its own python3 with torch 2.11 + CUDA 13, onnx, CPU-only onnxruntime).
# The project runs from its source folders there; what the image lacks travels in .gpu/
# (ignored by git), made here by `prepare`:
#
#   benchmarks/gpu_machine.sh prepare      # here: wheels, onnxruntime-gpu in ~55 MB parts, data
#   OUT=/some/dir benchmarks/gpu_machine.sh run   # there: install from .gpu/, run, write to OUT
#
# One transfer carries 64 MiB with the working tree: carry .gpu/wheels and the data in a
# first call, then one part of the onnxruntime-gpu wheel (255.6 MB) per call
# (.gpu/ort/part-aa, -ab, ...; .gpu/ort/NAME and SHA256SUMS with the first), calls back to back so
# the machine stays warm and keeps what earlier calls left; the last one runs `run`, which
# checks and joins the parts.
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
    grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >>.git/info/exclude
    mkdir -p "$KIT/wheels" "$KIT/ort"
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$KIT/wheels" "${SMALL_WHEELS[@]}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$KIT/ort" onnxruntime-gpu==1.31.1
    (cd "$KIT/ort" && wheel=$(ls onnxruntime_gpu-*.whl) && echo "$wheel" >NAME &&
        split -b 55M "$wheel" part- && rm "$wheel" && sha256sum part-* >SHA256SUMS)
    cp ../shared/data/cifar10-jpeg.tar.gz "$KIT/"
    du -sh "$KIT"/* "$KIT"/ort/*
    ;;
run)
    : "${OUT:?set OUT to the folder the report goes to}"
    wheel=/tmp/$(cat "$KIT/ort/NAME")
    (cd "$KIT/ort" && sha256sum -c --quiet SHA256SUMS && cat part-* >"$wheel")
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$KIT"/wheels/*.whl "$wheel"
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
    # DEVICE=cpu rehearses the same run on a machine without a GPU.
    python3 benchmarks/gpu_evidence.py --device "${DEVICE:-cuda}" --dataset imagefolder \
        --data-dir "$KIT/cifar10-jpeg.tar.gz" --out "$OUT/evidence" ${EPOCHS:+--epochs "$EPOCHS"}
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Quick start: set up from nothing and run the no-ImageNet demo on the CPU.
#   bash demo.sh [OUT_DIR] [--arch resnet ...]   (default ./demo_out; --arch resnet: the ResNet layout)
#   bash demo.sh [OUT_DIR] --data fashion_mnist [...]   (default ./fmnist_out/run; real images)
# Creates .venv if it is missing, installs requirements.txt into it, then draws a textured-shapes
# data set, trains a small CNN on it, and runs the four stage scripts on the strongest
# polysemantic channel they find. Extra arguments after OUT_DIR go to demo/run_demo.py.
# --data fashion_mnist: Fashion-MNIST (Debian's dataset-fashion-mnist) instead, a small ResNet trained on
# it, and the whole method on its strongest candidates; extra arguments go to demo/run_fashion.py.
set -euo pipefail
DATA=shapes
case "${1:-}" in
    -*|"") OUT="" ;;  # no OUT_DIR given, only flags (or nothing)
    *) OUT="$1"; shift ;;
esac
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA="${2:-}"; shift 2 || { echo "demo.sh: --data needs shapes or fashion_mnist" >&2; exit 2; } ;;
        --data=*) DATA="${1#--data=}"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
case "$DATA" in
    shapes) OUT="${OUT:-demo_out}" ;;
    fashion_mnist) OUT="${OUT:-fmnist_out/run}" ;;
    *) echo "demo.sh: --data $DATA: choose shapes or fashion_mnist" >&2; exit 2 ;;
esac
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where the command was typed
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    python3 -m venv .venv
fi
echo "installing requirements.txt into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ "$DATA" = fashion_mnist ]; then
    .venv/bin/python -m demo.run_fashion --out "$OUT" ${ARGS[@]+"${ARGS[@]}"}
else
    .venv/bin/python -m demo.run_demo --out "$OUT" ${ARGS[@]+"${ARGS[@]}"}
fi
echo "demo.sh done in ${SECONDS} s, set-up included"

#!/usr/bin/env bash
# Quick start: set up from nothing and run the no-ImageNet demo on the CPU.
#   bash demo.sh [OUT_DIR] [--arch resnet ...]   (default ./demo_out; --arch resnet: the ResNet layout)
#   bash demo.sh [OUT_DIR] --data fashion_mnist [--full ...]   (default ./fmnist_out/run; real images)
#   bash demo.sh --help   (both demos and their options)
# Creates .venv if it is missing, installs requirements.txt into it, then draws a textured-shapes
# data set, trains a small CNN on it, and runs the four stage scripts on the strongest
# polysemantic channel they find. Extra arguments after OUT_DIR go to demo/run_demo.py.
# --data fashion_mnist: Fashion-MNIST (Debian's dataset-fashion-mnist) instead, a small ResNet trained on
# it, and the whole method on its strongest candidates; extra arguments go to demo/run_fashion.py.
set -euo pipefail
usage() {
    cat <<'TEXT'
Usage: bash demo.sh [OUT_DIR] [--data shapes|fashion_mnist] [options of that demo]

Sets up .venv (created if missing, requirements.txt installed) and runs one of two demos on the CPU:

  --data shapes (default; OUT_DIR default ./demo_out): a generated data set of textured shapes, a small CNN
      trained on it, the four stage scripts on the strongest polysemantic channel they find, the feature
      visualizations and an atlas (a few minutes). Options go to demo/run_demo.py, e.g.
        --arch resnet       the layer in the paper's ResNet layout
        --seed S, --train_per_class N, --val_per_class N, --no_feature_vis, --no_atlas

  --data fashion_mnist (OUT_DIR default ./fmnist_out/run; needs apt-get install dataset-fashion-mnist):
      real images, a small ResNet trained here, the whole method on its strongest candidates, label-free
      concepts and the SAE view. Default: the quick recipe (2 epochs on 10,000 training images; 4.3 CPU-minutes, 18 minutes
      on a 2-core CPU at load 15). Options go to demo/run_fashion.py, e.g.
        --full              the larger recipe of docs/real_images.md (all 60,000 images, 5 epochs)
        --epochs N, --train_per_class N, --val_per_class N, --splits N, --train_threads N, --no_feature_vis
      Everything, the converted images included, goes inside OUT_DIR.
TEXT
    if [ -x .venv/bin/python ]; then
        echo; echo "=== demo/run_demo.py (--data shapes) ==="; .venv/bin/python -m demo.run_demo --help
        echo; echo "=== demo/run_fashion.py (--data fashion_mnist) ==="; .venv/bin/python -m demo.run_fashion --help
    else
        echo; echo "(every option: .venv/bin/python -m demo.run_demo --help, .venv/bin/python -m demo.run_fashion --help once .venv exists)"
    fi
}
for arg in "$@"; do
    case "$arg" in -h|--help) cd "$(dirname "$0")"; usage; exit 0 ;; esac
done
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

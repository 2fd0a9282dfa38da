#!/usr/bin/env bash
# Quick start: set up from nothing and run the no-ImageNet demo on the CPU.
#   bash demo.sh [OUT_DIR] [--arch resnet ...]   (default ./demo_out; --arch resnet: the ResNet layout)
# Creates .venv if it is missing, installs requirements.txt into it, then draws a textured-shapes
# data set, trains a small CNN on it, and runs the four stage scripts on the strongest
# polysemantic channel they find. Extra arguments after OUT_DIR go to demo/run_demo.py.
set -euo pipefail
case "${1:-}" in
    -*|"") OUT=demo_out ;;  # no OUT_DIR given, only flags (or nothing)
    *) OUT="$1"; shift ;;
esac
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where the command was typed
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    python3 -m venv .venv
fi
echo "installing requirements.txt into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m demo.run_demo --out "$OUT" "$@"
echo "demo.sh done in ${SECONDS} s, set-up included"

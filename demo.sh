#!/usr/bin/env bash
# Quick start: set up from nothing and run the no-ImageNet demo on the CPU.
#   bash demo.sh [OUT_DIR]        (default ./demo_out)
# Creates .venv if it is missing, installs requirements.txt into it, then draws a textured-shapes
# data set, trains a small CNN on it, and runs the four stage scripts on the strongest
# polysemantic channel they find. Extra arguments after OUT_DIR go to demo/run_demo.py.
set -euo pipefail
OUT="${1:-demo_out}"
shift || true
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

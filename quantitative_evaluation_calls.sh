#!/usr/bin/env bash
# Stage 4 (tau = 0.03) for the (channel, class1, class2) triples of TRIPLES (default: the paper's 20 of
# ResNet-50, layer4.2.conv3), all in one process: get_results.py --triples.
# Usage: bash quantitative_evaluation_calls.sh [DATA_DIR [MODEL_DIR]] [extra flags for get_results.py]
#   or:  DATA_DIR=/data/imagenet MODEL_DIR=/data/store bash quantitative_evaluation_calls.sh
# MODEL_DIR is the STORE_DIR of disentanglement_calls.sh (defaults to $STORE_DIR). Results go under
# OUT_DIR (default: the working directory): results_quantitative/means_required0.03.txt holds the
# column means per triple and over all of them. A rerun replaces rows, never duplicates.
# Your own model: TRIPLES=mine.txt bash quantitative_evaluation_calls.sh DATA STORE --model pkg.mod:factory --weights W
# The paper's --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 are passed only for
# --model resnet50 (the default) without a --layer_of_interest of your own.
# After stage 1 of your own model into STORE_DIR (with no resnet50 store there), the weights and layer flags may be left
# out: the stage scripts read them from the store's manifest. So may --model when it is a torchvision name; a factory
# (pkg.mod:factory, code) is never imported on a manifest's word: pass --model pkg.mod:factory.
# Python: $PYTHON if set, else the project's .venv/bin/python next to this script when present, else python3
#   (e.g. PYTHON=/path/to/env/bin/python bash ...).
# PER_TRIPLE=1: one process per triple (the published loop), stopping at the first failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then DATA_DIR=$1; shift; fi
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then MODEL_DIR=$1; shift; fi
MODEL_DIR=${MODEL_DIR:-${STORE_DIR:-}}
: "${DATA_DIR:?set DATA_DIR (ImageFolder root with train/ and val/) or pass it as the first argument}"
: "${MODEL_DIR:?set MODEL_DIR (or STORE_DIR: the store holding models_disentangled/) or pass it as the second argument}"
OUT_DIR=${OUT_DIR:-.}
STORE=$MODEL_DIR
. "$here/utils/run/call_flags.sh"  # PYTHON, TRIPLES, model, paper

if [ "${PER_TRIPLE:-0}" = 1 ]; then
  sed -e 's/#.*//' "$TRIPLES" | while read -r channel class1 class2 _; do
    [ -n "$channel" ] || continue
    echo "=== channel $channel: class $class1 vs class $class2"
    "$PYTHON" "$here/get_results.py" --data_dir "$DATA_DIR" --model_dir "$MODEL_DIR" ${model[@]+"${model[@]}"} \
      --batch_size 64 ${paper[@]+"${paper[@]}"} \
      --channel_of_interest "$channel" --classes_for_concept1 "$class1" --classes_for_concept2 "$class2" \
      --get_quantitative --proportion_attribution_required 0.03 --out_dir "$OUT_DIR" "$@" </dev/null
  done
else
  echo "=== every triple of $TRIPLES in one process"
  "$PYTHON" "$here/get_results.py" --data_dir "$DATA_DIR" --model_dir "$MODEL_DIR" ${model[@]+"${model[@]}"} \
    --batch_size 64 ${paper[@]+"${paper[@]}"} --triples "$TRIPLES" \
    --get_quantitative --proportion_attribution_required 0.03 --out_dir "$OUT_DIR" "$@" </dev/null
fi
echo "column means per triple and over all: $OUT_DIR/results_quantitative/means_required0.03.txt"

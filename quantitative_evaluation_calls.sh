#!/usr/bin/env bash
# Stage 4 (tau = 0.03) for the paper's 20 (channel, class1, class2) triples of ResNet-50, layer4.2.conv3.
# Usage: bash quantitative_evaluation_calls.sh [DATA_DIR [MODEL_DIR]] [extra flags for get_results.py]
#   or:  DATA_DIR=/data/imagenet MODEL_DIR=/data/store bash quantitative_evaluation_calls.sh
# MODEL_DIR is the STORE_DIR of disentanglement_calls.sh (defaults to $STORE_DIR). Results go under
# OUT_DIR (default: the working directory): results_quantitative/means_required0.03.txt holds the
# column means per triple and over all 20. Stops at the first failure; a rerun replaces rows, never duplicates.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then DATA_DIR=$1; shift; fi
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then MODEL_DIR=$1; shift; fi
MODEL_DIR=${MODEL_DIR:-${STORE_DIR:-}}
: "${DATA_DIR:?set DATA_DIR (ImageFolder root with train/ and val/) or pass it as the first argument}"
: "${MODEL_DIR:?set MODEL_DIR (or STORE_DIR: the store holding models_disentangled/) or pass it as the second argument}"
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-resnet50}
OUT_DIR=${OUT_DIR:-.}

TRIPLES=${TRIPLES:-$here/paper_triples.txt}  # "channel class1 class2" per line; # starts a comment
[ -f "$TRIPLES" ] || { echo "no triples file $TRIPLES" >&2; exit 2; }

grep -v '^\s*\(#\|$\)' "$TRIPLES" | while read -r channel class1 class2; do
  echo "=== channel $channel: class $class1 vs class $class2"
  "$PYTHON" "$here/get_results.py" --data_dir "$DATA_DIR" --model_dir "$MODEL_DIR" --model "$MODEL" \
    --batch_size 64 --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 \
    --channel_of_interest "$channel" --classes_for_concept1 "$class1" --classes_for_concept2 "$class2" \
    --get_quantitative --proportion_attribution_required 0.03 --out_dir "$OUT_DIR" "$@"
done
echo "column means per triple and over all: $OUT_DIR/results_quantitative/means_required0.03.txt"

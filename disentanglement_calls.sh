#!/usr/bin/env bash
# Stage 3 for the paper's 20 (channel, class1, class2) triples of ResNet-50 (IMAGENET1K_V1), layer4.2.conv3.
# Usage: bash disentanglement_calls.sh [DATA_DIR [STORE_DIR]] [extra flags for disentangle_channel.py]
#   or:  DATA_DIR=/data/imagenet STORE_DIR=/data/store bash disentanglement_calls.sh
# Needs stage 1 (get_importances_for_classes.py) run into STORE_DIR first. Stops at the first failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then DATA_DIR=$1; shift; fi
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then STORE_DIR=$1; shift; fi
: "${DATA_DIR:?set DATA_DIR (ImageFolder root with train/ and val/) or pass it as the first argument}"
: "${STORE_DIR:?set STORE_DIR (the store of stage 1) or pass it as the second argument}"
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-resnet50}

TRIPLES=${TRIPLES:-$here/paper_triples.txt}  # "channel class1 class2" per line; # starts a comment
[ -f "$TRIPLES" ] || { echo "no triples file $TRIPLES" >&2; exit 2; }

grep -v '^\s*\(#\|$\)' "$TRIPLES" | while read -r channel class1 class2; do
  echo "=== channel $channel: class $class1 vs class $class2"
  "$PYTHON" "$here/disentangle_channel.py" --data_dir "$DATA_DIR" --store_dir "$STORE_DIR" --model "$MODEL" \
    --batch_size 64 --nr_channels_in_layer_of_interest 2048 --channel_disentangle "$channel" \
    --classes_for_concept1 "$class1" --classes_for_concept2 "$class2" "$@" </dev/null
done

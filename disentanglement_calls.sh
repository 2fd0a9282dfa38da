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

TRIPLES="522,62,687 1404,385,834 895,631,946 242,515,619 522,61,687 1660,530,938 242,515,846 242,619,808
895,467,946 242,808,846 1349,27,889 1832,852,984 1773,791,958 1349,27,486 1698,57,515 1698,57,808
1698,58,515 1698,58,808 1698,53,515 1698,53,808"

for t in $TRIPLES; do
  IFS=, read -r channel class1 class2 <<<"$t"
  echo "=== channel $channel: class $class1 vs class $class2"
  "$PYTHON" "$here/disentangle_channel.py" --data_dir "$DATA_DIR" --store_dir "$STORE_DIR" --model "$MODEL" \
    --batch_size 64 --nr_channels_in_layer_of_interest 2048 --channel_disentangle "$channel" \
    --classes_for_concept1 "$class1" --classes_for_concept2 "$class2" "$@"
done

#!/usr/bin/env bash
# Stage 3 for the (channel, class1, class2) triples of TRIPLES (default: the paper's 20 of ResNet-50
# IMAGENET1K_V1, layer4.2.conv3), all in one process: disentangle_channel.py --triples.
# Usage: bash disentanglement_calls.sh [DATA_DIR [STORE_DIR]] [extra flags for disentangle_channel.py]
#   or:  DATA_DIR=/data/imagenet STORE_DIR=/data/store bash disentanglement_calls.sh
# Your own model: TRIPLES=mine.txt bash disentanglement_calls.sh DATA STORE --model pkg.mod:factory --weights W
# The paper's --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 are passed only for
# --model resnet50 (the default) without a --layer_of_interest of your own.
# After stage 1 of your own model into STORE_DIR (with no resnet50 store there), the weights and layer flags may be left
# out: the stage scripts read them from the store's manifest. So may --model when it is a torchvision name; a factory
# (pkg.mod:factory, code) is never imported on a manifest's word: pass --model pkg.mod:factory.
# Python: $PYTHON if set, else the project's .venv/bin/python next to this script when present, else python3
#   (e.g. PYTHON=/path/to/env/bin/python bash ...).
# PER_TRIPLE=1: one process per triple (the published loop), stopping at the first failure.
# Needs stage 1 (get_importances_for_classes.py) run into STORE_DIR first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then DATA_DIR=$1; shift; fi
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then STORE_DIR=$1; shift; fi
: "${DATA_DIR:?set DATA_DIR (ImageFolder root with train/ and val/) or pass it as the first argument}"
: "${STORE_DIR:?set STORE_DIR (the store of stage 1) or pass it as the second argument}"
STORE=$STORE_DIR
. "$here/utils/run/call_flags.sh"  # PYTHON, TRIPLES, model, paper

if [ "${PER_TRIPLE:-0}" = 1 ]; then
  sed -e 's/#.*//' "$TRIPLES" | while read -r channel class1 class2 _; do
    [ -n "$channel" ] || continue
    echo "=== channel $channel: class $class1 vs class $class2"
    "$PYTHON" "$here/disentangle_channel.py" --data_dir "$DATA_DIR" --store_dir "$STORE_DIR" ${model[@]+"${model[@]}"} \
      --batch_size 64 ${paper[@]+"${paper[@]}"} --channel_disentangle "$channel" \
      --classes_for_concept1 "$class1" --classes_for_concept2 "$class2" "$@" </dev/null
  done
else
  echo "=== every triple of $TRIPLES in one process"
  "$PYTHON" "$here/disentangle_channel.py" --data_dir "$DATA_DIR" --store_dir "$STORE_DIR" ${model[@]+"${model[@]}"} \
    --batch_size 64 ${paper[@]+"${paper[@]}"} --triples "$TRIPLES" "$@" </dev/null
fi

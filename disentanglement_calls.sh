#!/usr/bin/env bash
# Stage 3 for the (channel, class1, class2) triples of TRIPLES (default: the paper's 20 of ResNet-50
# IMAGENET1K_V1, layer4.2.conv3), all in one process: disentangle_channel.py --triples.
# Usage: bash disentanglement_calls.sh [DATA_DIR [STORE_DIR]] [extra flags for disentangle_channel.py]
#   or:  DATA_DIR=/data/imagenet STORE_DIR=/data/store bash disentanglement_calls.sh
# Your own model: TRIPLES=mine.txt bash disentanglement_calls.sh DATA STORE --model pkg.mod:factory --weights W
# The paper's --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 are passed only for
# --model resnet50 (the default) without a --layer_of_interest of your own.
# After stage 1 of your own model into STORE_DIR (with no resnet50 store there), --model and the layer flags may be left
# out: the stage scripts read them from the store's manifest.
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
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON=$here/.venv/bin/python; else PYTHON=python3; fi
fi
model_given=0; [ -n "${MODEL:-}" ] && model_given=1
MODEL=${MODEL:-resnet50}

TRIPLES=${TRIPLES:-$here/paper_triples.txt}  # "channel class1 class2" per line (several classes: 1,2); # comments
[ -f "$TRIPLES" ] || { echo "no triples file $TRIPLES" >&2; exit 2; }
# the model is the last --model among the extra flags, else $MODEL; the paper's layer flags only for resnet50
own_layer=0; prev=""
for a in "$@"; do
  [ "$prev" = --model ] && { MODEL=$a; model_given=1; }
  case "$a" in
    --model=*) MODEL=${a#--model=}; model_given=1 ;;
    --layer_of_interest|--layer_of_interest=*) own_layer=1 ;;
  esac
  prev=$a
done
paper=()
model=(--model "$MODEL")
own_store=0  # no model given, and the folder holds stores of other models only: the stages read it from the store
if [ $model_given = 0 ] && [ ! -d "$STORE_DIR/resnet50_channel_importances" ]; then
  for f in "$STORE_DIR"/*_channel_importances; do [ -f "$f/manifest.json" ] && own_store=1; done
fi
if [ $own_store = 1 ]; then
  model=()
elif [ "$MODEL" = resnet50 ] && [ $own_layer = 0 ]; then
  paper=(--nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3)
fi

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

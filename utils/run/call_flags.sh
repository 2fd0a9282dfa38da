# Sourced by disentanglement_calls.sh and quantitative_evaluation_calls.sh after they have set $here (the
# repository), $STORE (the store folder of stage 1) and consumed DATA_DIR and the store folder from their
# arguments; "$@" holds the extra flags for the stage script. Sets:
#   PYTHON   $PYTHON if set, else $here/.venv/bin/python when present, else python3
#   TRIPLES  $TRIPLES, default $here/paper_triples.txt (exit 2 when it is missing)
#   model    (--model M), or () when no model is given and the store folder holds stores of other models only
#            (the stage scripts then read it from the store's manifest: a torchvision name; a factory they refuse
#            unless --model names it)
#   paper    the paper's --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 for
#            --model resnet50 (the default) without a --layer_of_interest of the user's own, else ()
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
if [ $model_given = 0 ] && [ ! -d "$STORE/resnet50_channel_importances" ]; then
  for f in "$STORE"/*_channel_importances; do [ -f "$f/manifest.json" ] && own_store=1; done
fi
if [ $own_store = 1 ]; then
  model=()
elif [ "$MODEL" = resnet50 ] && [ $own_layer = 0 ]; then
  paper=(--nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3)
fi

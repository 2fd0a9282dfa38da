"""Channel disentanglement for CNN interpretability (Hesse et al., CVPRW 2025): the package map.

The four stage scripts only parse flags, turn them into settings (``run/settings_of_flags``) and call ``stages``; ``method`` holds the math, the other packages
what the math needs around it. The method itself, in words and formulas: docs/method.md.

- ``method/``      the math, pure functions on tensors (no files, loaders, flags or prints; a test enforces it):
  ``attribution`` (a x g, patch sums), ``similarities`` (stage 2: histograms, ARVs, cosines), ``split`` (the
  split rule for k concepts, merge weights), ``rho_scores`` (the best-rho scores), ``evaluation`` (stage 4's
  numbers), ``clustering`` (label-free concepts), ``sae`` (TopK SAE), ``whole_layer`` (every split
  channel of a layer at once)
- ``model/``       ``loading`` (models, weights, layers), ``layer_view`` (a conv, grouped conv or Linear as one kind of
  layer: a unit is a weighted sum of input channels over positions), ``layer_survey`` (which layers are
  supported, the default layer, why the others are refused), ``tap`` (a layer's input and output; a forward
  that stops there), ``checkpoint`` (what a split checkpoint holds), ``disentangled`` (the disentangled network of
  one channel: surgery, network check, export, ``load_disentangled_model``), ``whole_layer`` (the whole-layer
  network: build, export, load)
- ``data/``        ``folders`` (ImageFolder, transform, loaders), ``scan`` (the one pass over images up to a
  layer, read as its ``ScanPlan`` says), ``classmap`` (class folders to model outputs), ``cpu_decode``,
  ``gpu_decode``, ``overlap`` (stage 1)
- ``files/``       ``names`` (every file name the stages write or read), ``atomic`` (writes, locks, strict JSON, a
  full disk), ``leftovers`` (a killed writer's temporary files, removed by the next run), ``reading`` (one reading
  helper per format: a damaged file is one line), ``digests`` (sha256 records and when to verify them), ``store``
  (stage 1's arrays and manifest), ``rows`` (reading store rows), ``registry`` (stage 4's quantitative runs),
  ``cache`` (stage 4's caches: the store, or the user's cache folder for a read-only store)
- ``concepts/``    a split's concepts behind the interfaces of ``base`` (the method's three questions; naming and
  extras beside them): by classes (``by_classes``: the class lists, ``--triples`` files) or by clusters of a
  concepts file (``by_clusters``); ``candidates`` (the strongest channels of stage 2's candidates or of a
  concepts file, ``--candidates``); ``source`` (``ConceptSource``: which of these a command line gives, and its
  one ``read``); ``checks`` (a channel the layer has, disjoint classes that exist)
- ``stages/``      what each stage does, one module per stage and its parts named after it: ``stage1`` (+
  ``stage1_pass``: the pass over the training images), ``stage2`` (+ ``stage2_passes``: the chunked passes over
  the store; ``stage2_advice``: the layer at other tau and p when few candidates pass), ``label_free``,
  ``stage3``, ``stage4`` (+ ``stage4_checkpoints``, ``stage4_passes``, ``stage4_results``, ``stage4_extras``,
  ``stage4_tau``: stage 2's tau), ``feature_vis`` (+ ``feature_vis_shards``: over torchrun processes;
  ``feature_vis_estimate``: the plan and time) and ``sae_view`` (stage 4's extras); ``distributed`` (the torchrun
  process group of stages 1 and 4)
- ``featurevis/``  feature visualizations (MACO) as lucent's optvis: ``param``, ``transform``, ``objectives``,
  ``render``, ``spectrum``, ``settings``
- ``report/``      what the user sees: ``plots``, ``tables``, ``stage3_text``, ``latex``
- ``atlas/``       the static site of a layer's split channels: ``collect``, ``html``, ``safe`` (every value and
  link that reaches HTML), ``write``
- ``run/``         the only modules (with the four scripts) that read parsed flags: ``cli`` (shared flags,
  one-line error reporting), ``flags`` (every stage's own flags), ``settings_of_flags`` (the flags into each
  stage's frozen Settings, by keyword), ``device`` (the device from the flags and torchrun), ``context`` (what a
  stage sets up from its flags and the store; ``Spec``: what they resolve to), ``call_flags.sh`` (the call
  scripts' shared flags). The top of the package: nothing below imports it (``__main__`` entry points aside)
- ``errors``       ``UserError``, the one-line error for bad input (the bottom: it imports nothing of ours)
- ``finite``       NaN or infinity in weights, attributions, scores: refused in one line
- ``disentangle``  ``load_disentangled_model`` and the rest of ``model/disentangled`` at the path exported model
  files name
- ``api/``         the stages from Python (a notebook; docs/python.md): ``calls`` (one call per stage script),
  ``keywords`` (keywords to the script's flags), ``written`` (the files a call wrote), ``result`` (what it returns)
"""

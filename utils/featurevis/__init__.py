"""Feature visualizations (MACO), laid out as lucent's optvis: ``param`` (the image from a spectrum's phase),
``transform`` (crops, noise, the evaluation view), ``objectives`` (a checkpoint's targets), ``render`` (the
optimization, receptive fields), ``spectrum`` (the training images' spectrum and its file), ``settings`` (the
``--fv_*`` flags). Stage 4's run for a checkpoint is ``utils.stages.feature_vis``."""

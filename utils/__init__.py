"""Channel disentanglement for CNN interpretability (Hesse et al., CVPRW 2025): the package map.

- ``method/``      the method's math, pure functions on tensors (no files, loaders, flags or prints)
- ``model/``       loading a model and its weights, finding a layer
- ``data/``        image folders, transforms, loaders, decoding on CPU and GPU, class folders to outputs
- ``files/``       every file name (``names``), atomic writes and locks, the stage-1 store
- ``concepts/``    a split's concepts: given as classes (``--triples``) or as clusters (``--concepts_file``)
- ``stages/``      what each stage does with a model, a store and concepts
- ``featurevis/``  feature visualizations (MACO)
- ``report/``      what the user sees: plots and contact sheets
- ``run/``         command lines, one-line errors, devices, processes, the context a stage runs in
- ``disentangle``  the disentangled network: surgery, export, ``load_disentangled_model`` (exported files name
  this path)
"""

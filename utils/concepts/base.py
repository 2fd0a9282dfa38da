"""The concepts of one split, whatever defines them: the one interface the stages ask.

A job splits channel c into k >= 2 concepts. Concept j is given by classes (``by_classes.Triple``: the
images of some classes, ``--classes_for_concept{j}`` or a ``--triples`` line) or by a cluster of a concepts
file (``by_clusters.ClusterConcepts``: some store rows, ``--concepts_file``); another kind subclasses
``Concepts`` and answers every question below (checked when the subclass is defined). The stages never ask
which kind they hold. The contract (j is 1-based; ``names``: the class folder names):

stage 3 (training split, the store)
  ``k``, ``channel``; ``where``              ``"FILE line N"`` for messages, or ``""``
  ``training_rows(targets)``   k int64 arrays of store rows (= ImageFolder indices): concept j's readable
                               training images, from which v_j and the image's concept in the scoring pass
                               come (row i is of concept j iff i is in rows[j-1]). targets: (N,) the store's
                               labels, -1 for unreadable images. UserError (one line) where a concept has none
                               or names unreadable rows
  ``describe()``               the concepts in a few words: ``'[0] vs [1]'``, ``'clusters 0 vs 2'``
  ``label(names, j)``          how stage 3's report names concept j
  ``checkpoint(name, rho)``    the checkpoint file name of ``rho`` (a float or ``"best"``) for the model/layer
                               ``name`` (``utils.files.names``)
  ``info_keys()``              the keys of ``…_info.json`` that say what the concepts were (in file order)
stage 4 (val split)
  ``concepts_sha256``          sha256 of the file the concepts came from, or None
  ``val_images(ds, data_dir, val_top_n, scan_arvs)``  the val images to evaluate (a ``ValImages``);
                               ``scan_arvs(channel, indices)`` -> (scanned indices, summed (M,), arvs (M, C_in))
                               is a pass over val images, called only by kinds whose val images are chosen by
                               activation (``val_top_n``: that flag, or None). UserError where a concept has none
  ``val_ids(val, labels, indices)``  (N,) int64 concept id 1..k (0: none) of evaluated val images
  ``no_val_images(j)``         why concept j has no evaluated val image (the one-line error's text)
  ``val_label(names, j)``      how stage 4 names concept j in its lines and plot titles
  ``summary_keys(names, val)`` the keys of ``…_summary.json`` that say what the concepts were
  ``val_scope()``              which val images the contact sheet ranks, in words
  ``featurevis_concepts(index, ids)``  (k class lists, None), or (k empty lists, (index, ids)) where the
                               concepts are no classes: what the feature visualizations take (index, ids: the
                               evaluated val images and their concept ids)
  ``sae_classes()``            the classes whose val images the SAE view reads, or None for every val image
"""
from dataclasses import dataclass, field

ASKED = ("training_rows", "describe", "label", "checkpoint", "info_keys", "val_images", "val_ids", "no_val_images",
         "val_label", "summary_keys", "val_scope", "featurevis_concepts", "sae_classes")


@dataclass
class ValImages:
    """The val images one job evaluates. indices: sorted val dataset indices; classes: the classes whose
    images of ``indices`` the job keeps; note: a line to print, or None; top_n: how many top val images were
    assigned to concepts (None where the concepts are classes); assigned: val index -> concept id (where the
    ids do not come from the labels)."""
    indices: list
    classes: list
    note: str = None
    top_n: int = None
    assigned: dict = field(default_factory=dict, repr=False)


class Concepts:
    """The interface (see the module docstring); subclasses are dataclasses with ``channel`` and ``k``."""
    where = ""
    concepts_sha256 = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [n for n in ASKED if not callable(getattr(cls, n, None))]
        if missing:
            raise TypeError(f"{cls.__name__} does not answer {', '.join(missing)} (utils.concepts.base)")

"""The concepts of one split, whatever defines them: the one interface the stages ask.

A job splits channel c into k >= 2 concepts. Concept j is given by classes (``by_classes.Triple``: the
images of some classes, ``--classes_for_concept{j}`` or a ``--triples`` line) or by a cluster of a concepts
file (``by_clusters.ClusterConcepts``: some store rows, ``--concepts_file``); another kind subclasses
``Concepts``. The stages never ask which kind they hold; they ask:

stage 3 (training split, the store)
  ``k``, ``channel``, ``where`` (``"FILE line N"`` for messages, or ``""``)
  ``training_rows(targets)``   k int64 arrays of store rows (= ImageFolder indices): concept j's readable
                               training images, from which v_j and its ids in the scoring pass come (an
                               image of row i is of concept j iff i is in rows[j-1]); UserError if one is empty
  ``describe()``               ``'[0] vs [1]'`` / ``'clusters 0 vs 2'``
  ``label(names, j)``          how stage 3's report names concept j (``names``: the class folder names)
  ``checkpoint(name, rho)``    the checkpoint file name for ``rho`` (a float or ``"best"``; ``utils.files.names``)
  ``info_keys()``              the keys of ``…_info.json`` that say what the concepts were
stage 4 (val split)
  ``concepts_sha256``          sha256 of the file the concepts came from, or None
  ``val_images(ds, data_dir, val_top_n, scan_arvs)``  the val images to evaluate (``ValImages``)
  ``val_ids(val, labels, indices)``  (N,) concept id 1..k (0: none) of evaluated val images
  ``no_val_images(j)``         why concept j has no evaluated val image (the one-line error's text)
  ``val_label(names, j)``, ``summary_keys(names, val)``, ``val_scope()`` (the contact sheet's words)
  ``featurevis_concepts(index, ids)`` ``(class lists, val images or None)`` for the feature visualizations
  ``sae_classes()``            the classes whose val images the SAE view reads (None: every val image)
"""
from dataclasses import dataclass, field


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

    def training_rows(self, targets):
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    def label(self, names, j):
        raise NotImplementedError

    def checkpoint(self, name, rho):
        raise NotImplementedError

    def info_keys(self):
        raise NotImplementedError

    def val_images(self, ds, data_dir, val_top_n, scan_arvs):
        """``scan_arvs(channel, indices)`` -> (scanned indices, summed (M,), arvs (M, C_in)): a pass over val
        images, called only by kinds whose val images are chosen by activation."""
        raise NotImplementedError

    def val_ids(self, val, labels, indices):
        raise NotImplementedError

    def no_val_images(self, j):
        raise NotImplementedError

    def val_label(self, names, j):
        raise NotImplementedError

    def summary_keys(self, names, val):
        raise NotImplementedError

    def val_scope(self):
        raise NotImplementedError

    def featurevis_concepts(self, index, ids):
        raise NotImplementedError

    def sae_classes(self):
        raise NotImplementedError

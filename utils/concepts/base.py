"""The concepts of one split, whatever defines them: the interfaces the stages ask.

A job splits channel c into k >= 2 concepts. Concept j is given by classes (``by_classes.Triple``: the
images of some classes, ``--classes_for_concept{j}`` or a ``--triples`` line) or by a cluster of a concepts
file (``by_clusters.ClusterConcepts``: some store rows, ``--concepts_file``). The stages never ask which kind
they hold. Three interfaces, each checked when a subclass is defined (j is 1-based; ``names``: the class folder
names):

``Concepts``: what the method needs (stage 3 splits on the training split, stage 4 evaluates on the val split)
  ``k``, ``channel``; ``where``              ``"FILE line N"`` for messages, or ``""``
  ``training_rows(targets)``   k int64 arrays of store rows (= ImageFolder indices): concept j's readable
                               training images, from which v_j and the image's concept in the scoring pass
                               come (row i is of concept j iff i is in rows[j-1]). targets: (N,) the store's
                               labels, -1 for unreadable images. UserError (one line) where a concept has none
                               or names unreadable rows
  ``val_images(ds, data_dir, val_top_n, scan_arvs)``  the val images to evaluate (a ``ValImages``);
                               ``scan_arvs(channel, indices)`` -> (scanned indices, summed (M,), arvs (M, C_in))
                               is a pass over val images, called only by kinds whose val images are chosen by
                               activation (``val_top_n``: that flag, or None). UserError where a concept has none
  ``val_ids(val, labels, indices)``  (N,) int64 concept id 1..k (0: none) of evaluated val images

``ConceptNames``: how files, reports and messages name them
  ``describe()``               the concepts in a few words: ``'[0] vs [1]'``, ``'clusters 0 vs 2'``
  ``label(names, j)``          how stage 3's report names concept j
  ``checkpoint(name, rho)``    the checkpoint file name of ``rho`` (a float or ``"best"``) for the model/layer
                               ``name`` (``utils.files.names``)
  ``info_keys()``              the keys of ``…_info.json`` that say what the concepts were (in file order)
  ``concepts_sha256``          sha256 of the file the concepts came from, or None
  ``no_val_images(j)``         why concept j has no evaluated val image (the one-line error's text)
  ``val_label(names, j)``      how stage 4 names concept j in its lines and plot titles
  ``summary_keys(names, val)`` the keys of ``…_summary.json`` that say what the concepts were
  ``val_scope()``              which val images the contact sheet ranks, in words

``ConceptExtras``: what stage 4's extras take
  ``featurevis_concepts(index, ids)``  (k class lists, None), or (k empty lists, (index, ids)) where the
                               concepts are no classes: what the feature visualizations take (index, ids: the
                               evaluated val images and their concept ids)
  ``sae_classes()``            the classes whose val images the SAE view reads, or None for every val image

``StageConcepts`` is all three: what a kind of concepts subclasses so that every stage can hold it.
"""
from dataclasses import dataclass, field

METHOD = ("training_rows", "val_images", "val_ids")
NAMING = ("describe", "label", "checkpoint", "info_keys", "no_val_images", "val_label", "summary_keys", "val_scope")
EXTRAS = ("featurevis_concepts", "sae_classes")
ASKED = METHOD + NAMING + EXTRAS  # what the stages ask of the concepts they hold


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


class _Interface:
    """Checks, when a subclass is defined, that it answers the questions ``asked`` of every interface it derives."""
    asked = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        wanted = [n for base in cls.__mro__ for n in base.__dict__.get("asked", ())]
        missing = [n for n in dict.fromkeys(wanted) if not callable(getattr(cls, n, None))]
        if missing and "asked" not in cls.__dict__:  # the interfaces themselves answer nothing
            raise TypeError(f"{cls.__name__} does not answer {', '.join(missing)} (utils.concepts.base)")


class Concepts(_Interface):
    """What the method needs (see the module docstring); subclasses are dataclasses with ``channel`` and ``k``."""
    asked = METHOD
    where = ""


class ConceptNames(_Interface):
    """How files, reports and messages name the concepts (see the module docstring)."""
    asked = NAMING
    concepts_sha256 = None


class ConceptExtras(_Interface):
    """What stage 4's feature visualizations and SAE view take (see the module docstring)."""
    asked = EXTRAS


class StageConcepts(Concepts, ConceptNames, ConceptExtras):
    """All three interfaces: what a kind of concepts subclasses so that every stage can hold it."""
    asked = ()

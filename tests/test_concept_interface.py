"""The concepts interface (utils/concepts/base.py) on hand-built cases: both kinds answer every question, with
the training rows, concept ids, names and file keys worked out by hand."""
import inspect
import re

import numpy as np
import pytest
import torch

from utils.concepts.base import ASKED, EXTRAS, METHOD, NAMING, Concepts, ConceptExtras, ConceptNames, ValImages
from utils.concepts.by_classes import Triple, class_ids
from utils.concepts.by_clusters import ClusterConcepts
from utils.errors import UserError

NAMES = ["cat", "dog", "car", "cup", "owl"]
# store labels of 8 training rows; -1: an image stage 1 could not read
TARGETS = np.array([0, 1, -1, 2, 0, 3, 1, 2])


def clusters(sign=1):
    """Channel 5, clusters 2 and 0 of three (centroids in the L1-normalised ARV space of 2 input channels)."""
    return ClusterConcepts(channel=5, clusters=[2, 0], rows=[np.array([1, 3]), np.array([0, 6])],
                           centroids=torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64),
                           sign=sign, top_n=4, path="c.json", sha256="ab" * 32,
                           class_counts=[[[1, 1], [2, 1]], [[0, 1], [1, 1]]])


class Val:
    """A val split of len(targets) images of NAMES' classes."""
    classes = NAMES

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def test_every_kind_answers_every_question():
    """The docstring documents each interface's questions under its heading; the method's interface asks three
    (plus ``k`` and ``channel``), naming and extras sit beside it; a kind missing one is refused when defined."""
    doc = inspect.getmodule(Concepts).__doc__
    parts = re.split(r"^``(Concepts|ConceptNames|ConceptExtras)``:", doc, flags=re.M)
    documented = {parts[i]: re.findall(r"^  ``(\w+)\(", parts[i + 1], flags=re.M) for i in range(1, len(parts), 2)}
    assert documented == {"Concepts": list(METHOD), "ConceptNames": list(NAMING), "ConceptExtras": list(EXTRAS)}
    assert len(METHOD) == 3 and sorted(ASKED) == sorted(METHOD + NAMING + EXTRAS) and len(ASKED) == 13
    for kind in (Triple, ClusterConcepts):
        assert all(issubclass(kind, i) for i in (Concepts, ConceptNames, ConceptExtras))
        assert all(callable(getattr(kind, n)) for n in ASKED)
    with pytest.raises(TypeError, match="does not answer val_ids, sae_classes"):
        type("Half", (Concepts, ConceptExtras), {n: lambda self: None for n in ASKED if n not in ("val_ids", "sae_classes")})
    method_only = type("MethodOnly", (Concepts,), {n: lambda self: None for n in METHOD})  # no naming asked
    assert issubclass(method_only, Concepts) and not issubclass(method_only, ConceptNames)


def test_training_rows_by_hand():
    t = Triple(5, [0], [1, 3], more=[[2]])
    assert [r.tolist() for r in t.training_rows(TARGETS)] == [[0, 4], [1, 5, 6], [3, 7]]
    assert t.k == 3
    with pytest.raises(UserError, match=r"^--classes_for_concept2 \[4\]: no readable training image"):
        Triple(5, [0], [4]).training_rows(TARGETS)
    with pytest.raises(UserError, match=r"^t.txt line 3: concept 1 \[4\]: no readable"):
        Triple(5, [4], [0], "t.txt line 3").training_rows(TARGETS)
    c = clusters()
    assert [r.tolist() for r in c.training_rows(TARGETS)] == [[1, 3], [0, 6]] and c.k == 2
    c.rows[1] = np.array([0, 2])  # row 2 is unreadable
    with pytest.raises(UserError, match="cluster 0 of channel 5 holds rows of images stage 1 could not read"):
        c.training_rows(TARGETS)


def test_names_and_words():
    t = Triple(5, [0], [1, 3])
    assert t.describe() == "[0] vs [1, 3]" and clusters().describe() == "clusters 2 vs 0"
    assert t.checkpoint("m", 0.05) == "m_channel5_classes1[0]_classes2[1, 3]_f0.05_unnormalized.pth"
    assert Triple(5, [0], [1], more=[[2, 4]]).checkpoint("m", "best") == \
        "m_channel5_classes1[0]_classes2[1]_classes3[2, 4]_f_best_unnormalized.pth"
    assert clusters().checkpoint("m", 1.0) == "m_channel5_top4_clusters2-0_f1.0_unnormalized.pth"
    assert clusters().checkpoint("m", "best") == "m_channel5_top4_clusters2-0_f_best_unnormalized.pth"
    assert t.label(NAMES, 2) == "['dog', 'cup']" and t.val_label(NAMES, 2) == "dog, cup"
    assert clusters().label(NAMES, 1) == "cluster 2 (dog x1, car x1)" and clusters().val_label(NAMES, 2) == "cluster 0"
    assert t.val_scope() == "val images of both concepts"
    assert Triple(5, [0], [1], more=[[2]]).val_scope() == clusters().val_scope().replace("2", "3")
    assert t.concepts_sha256 is None and clusters().concepts_sha256 == "ab" * 32


def test_file_keys():
    t = Triple(5, [0], [1, 3], more=[[2]])
    assert t.info_keys() == {"classes1": [0], "classes2": [1, 3], "classes3": [2]}
    assert list(t.summary_keys(NAMES, None)) == ["classes1", "classes2", "classes3", "class_names1",
                                                  "class_names2", "class_names3"]
    assert t.summary_keys(NAMES, None)["class_names2"] == ["dog", "cup"]
    c = clusters()
    info = c.info_keys()
    assert list(info) == ["clusters", "concepts_file", "concepts_sha256", "top_n", "sign"]
    assert info["clusters"] == [2, 0] and info["concepts_file"].endswith("c.json") and info["top_n"] == 4
    assert c.summary_keys(NAMES, ValImages([], [], top_n=3))["val_top_n"] == 3


def test_val_images_and_ids_of_classes():
    ds = Val([0, 1, 1, 2, 3, 0])
    t = Triple(5, [0], [1, 3])
    val = t.val_images(ds, "D", None, scan_arvs=None)
    assert val.indices == [0, 1, 2, 4, 5] and sorted(val.classes) == [0, 1, 3]
    assert class_ids(np.array([3, 0, 2, 1]), t.concepts).tolist() == [2, 1, 0, 2]
    assert t.val_ids(val, np.array([3, 0, 2, 1]), [4, 0, 3, 1]).tolist() == [2, 1, 0, 2]
    with pytest.raises(UserError, match=r"^--classes_for_concept2: no val images of classes \[4\] under D/val"):
        Triple(5, [0], [4]).val_images(ds, "D", None, None)
    assert t.featurevis_concepts([0, 1], None) == ([[0], [1, 3]], None) and t.sae_classes() == [0, 1, 3]


def test_val_images_and_ids_of_clusters():
    """Six val images; ARVs near centroid 0, 1 or 2; top 4 by summed activation (sign +1) or most negative
    (sign -1). Only clusters 2 (concept 1) and 0 (concept 2) are used: an image nearest to cluster 1 is left out."""
    ds = Val([0] * 7)
    arvs = np.array([[3.0, 0.1], [0.2, 4.0], [1.0, 1.0], [2.0, 0.0], [0.0, 1.0], [5.0, 0.2]])
    summed = np.array([9.0, 8.0, 7.0, 1.0, 6.0, -5.0])
    asked = []

    def scan_arvs(channel, indices):
        asked.append((channel, indices))
        return [0, 1, 2, 4, 5, 6], summed, arvs  # val image 3 unreadable: the scan's positions are indices 0..6

    c = clusters()
    val = c.val_images(ds, "D", None, scan_arvs)
    assert asked == [(5, list(range(7)))]
    # top 4 positions 0, 1, 2, 4 -> nearest centroids 0, 2, 1, 2 -> concept 2, 1, none, 1 at indices 0, 1, 2, 5
    assert val.top_n == 4 and val.assigned == {0: 2, 1: 1, 5: 1} and val.indices == [0, 1, 5]
    assert val.classes == list(range(len(NAMES)))
    assert val.note.endswith("the top 4 of 6 val images by summed activation of channel 5, by the nearest of its "
                             "3 cluster centroids: cluster 2: 2, cluster 0: 1")
    assert c.val_ids(val, None, [5, 0, 1]).tolist() == [1, 2, 1]
    neg = clusters(sign=-1).val_images(ds, "D", 2, scan_arvs)  # the two most negative: positions 5 and 3
    assert neg.top_n == 2 and neg.assigned == {6: 2, 4: 2} and "most negative summed" in neg.note
    lists, images = c.featurevis_concepts([0, 1, 4], np.array([2, 1, 1]))
    assert lists == [[], []] and images[0] == [0, 1, 4] and c.sae_classes() is None
    assert "pass a larger --val_top_n" in c.no_val_images(1) and "(cluster 2)" in c.no_val_images(1)

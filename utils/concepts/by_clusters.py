"""Concepts given as clusters of a channel's top training images (``--concepts_file``, stages 3 and 4).

The concepts file (schema: ``utils.concepts``) lists, per channel, k clusters of store rows found without
labels. Stage 3 takes some or all of a channel's clusters as its concepts: concept j's training images are
cluster j's rows, v_j = mean ARV over those rows (closed form from the store's patch sums, as for classes).
Stage 4 has no labels for the val images: among the channel's top-N val images by summed activation
s_n = sum_{h,w} a_n[c,h,w] (most negative first where the file's sign is -1), an image belongs to concept j
when its L1-normalised ARV (r_n[i] = sum_{kh,kw} W[c,i] P_n[i], P_n the patch sums of the layer's input,
from the same forward pass) is nearest to cluster j's centroid among all the channel's clusters; images
nearest to a cluster the split does not use belong to no concept.
"""
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from utils.concepts.base import StageConcepts, ValImages
from utils.files import names as file_names
from utils.files import store
from utils.errors import UserError
from utils.method.clustering import nearest_centroid
from utils.method.evaluation import top_k

# the fingerprint keys that say which model, layer and data made the file (the training split for stage 3)
MODEL_KEYS = ("model", "weights_sha256", "layer", "layer_geometry", "classes")


@dataclass
class ClusterConcepts(StageConcepts):
    """One channel's concepts taken from a concepts file: concept j = cluster ``clusters[j-1]``, its training
    images the cluster's store rows, its val images those of the top-N val images nearest to its centroid.
    The ``StageConcepts`` interfaces (``utils.concepts.base``)."""
    channel: int
    clusters: list      # the cluster indices used, in the order of the concepts (concept j = clusters[j-1])
    rows: list          # k sorted int64 arrays: the store rows (training ImageFolder indices) of each concept
    centroids: torch.Tensor  # (K, C_in) float64: the centroids of ALL the channel's clusters
    sign: int           # 1, or -1 where "top" means most negative summed activation
    top_n: int
    path: str
    sha256: str
    class_counts: list  # per concept: [[class index, count], ...] as in the file

    @property
    def k(self):
        return len(self.clusters)

    @property
    def concepts_sha256(self):
        return self.sha256

    def training_rows(self, targets):
        """The clusters' rows; UserError where one holds an image stage 1 could not read (label -1)."""
        for j, r in zip(self.clusters, self.rows):
            if (targets[r] < 0).any():
                raise UserError(f"--concepts_file {self.path}: cluster {j} of channel {self.channel} holds rows "
                                f"of images stage 1 could not read; rerun the discovery on this store")
        return list(self.rows)

    def describe(self):
        return "clusters " + " vs ".join(str(j) for j in self.clusters)

    def label(self, names, j):
        """``cluster 2 (red_dotted x29, ...)``: the cluster and its three commonest classes."""
        top = sorted(self.class_counts[j - 1], key=lambda yc: -yc[1])[:3]
        return f"cluster {self.clusters[j - 1]} (" + ", ".join(f"{names[y]} x{n}" for y, n in top) + ")"

    def checkpoint(self, name, rho):
        return file_names.cluster_checkpoint(name, self.channel, self.top_n, self.clusters, rho)

    def info_keys(self):
        return dict(clusters=self.clusters, concepts_file=os.path.abspath(self.path), concepts_sha256=self.sha256,
                    top_n=self.top_n, sign=self.sign)

    def val_images(self, ds, data_dir, val_top_n, scan_arvs):
        """The top-N val images by summed activation (N = ``val_top_n``, else the file's top_n, at most all),
        each assigned to the concept of its nearest centroid (``assign_val_concepts``); those nearest to a
        cluster the split does not use are left out. ``scan_arvs``: a pass over every val image."""
        n_top = min(val_top_n or self.top_n or len(ds), len(ds))
        scanned, summed, arvs = scan_arvs(self.channel, list(range(len(ds))))
        ids = assign_val_concepts(summed, arvs, self.sign, n_top, self.centroids, self.clusters)
        assigned = {int(i): int(j) for i, j in zip(scanned, ids) if j > 0}
        note = (f"concepts of the val images: the top {n_top} of {len(scanned)} val images by "
                f"{'most negative ' if self.sign < 0 else ''}summed activation of channel {self.channel}, by the "
                f"nearest of its {len(self.centroids)} cluster centroids: "
                + ", ".join(f"cluster {cl}: {int((ids == j).sum())}" for j, cl in enumerate(self.clusters, start=1)))
        return ValImages(sorted(assigned), list(range(len(ds.classes))), note, n_top, assigned)

    def val_ids(self, val, labels, indices):
        return np.asarray([val.assigned[int(i)] for i in indices], dtype=np.int64)

    def no_val_images(self, j):
        return (f"concept {j} (cluster {self.clusters[j - 1]}): none of the top val images is nearest to its "
                f"centroid; pass a larger --val_top_n")

    def val_label(self, names, j):
        return f"cluster {self.clusters[j - 1]}"

    def summary_keys(self, names, val):
        return {"clusters": self.clusters, "concepts_file": os.path.abspath(self.path),
                "concepts_sha256": self.sha256, "val_top_n": val.top_n}

    def val_scope(self):
        return f"val images of the {self.k} concepts"

    def featurevis_concepts(self, index, ids):
        """No class lists: the feature visualizations take the evaluated val images and their concept ids."""
        return [[] for _ in range(self.k)], (list(index), ids)

    def sae_classes(self):
        return None


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_concepts_file(path, fingerprint, channel, clusters=None, keys=store.MATCH_KEYS, num_rows=None):
    """The concepts of ``channel`` from the concepts file ``path``; UserError (one line) when the file cannot
    be read, was made from another store (``keys`` of its fingerprint differ from ``fingerprint``), lacks the
    channel, names a cluster it does not have (or one twice), or gives fewer than two concepts.

    clusters: the cluster indices to use (default all, in file order); num_rows: the store's row count, to
    refuse rows outside it. Returns a ClusterConcepts.
    """
    return ConceptsFile.read(path).concepts(fingerprint, channel, clusters, keys, num_rows)


@dataclass
class ConceptsFile:
    """A concepts file read once (its JSON ``doc`` and ``sha256``), for the concepts of any of its channels."""
    path: str
    doc: dict
    sha256: str

    @classmethod
    def read(cls, path):
        return cls(path, _document(path, f"--concepts_file {path}"), file_sha256(path))

    def concepts(self, fingerprint, channel, clusters=None, keys=store.MATCH_KEYS, num_rows=None):
        """``read_concepts_file``'s ClusterConcepts of ``channel``, checked as there."""
        path, doc = self.path, self.doc
        flag = f"--concepts_file {path}"
        diff = store.describe_mismatch(doc["fingerprint"], fingerprint, keys)
        if diff:
            raise UserError(f"{flag} was made from another store or model: {diff}")
        entry = _channel_entry(doc["channels"], channel, flag)
        all_clusters = entry.get("clusters") or []
        chosen = _chosen_clusters(len(all_clusters), clusters, channel, path)
        rows = _cluster_rows(all_clusters, chosen, channel, flag, num_rows)
        centroids = torch.tensor([cl["centroid"] for cl in all_clusters], dtype=torch.float64)
        return ClusterConcepts(channel=channel, clusters=chosen, rows=rows, centroids=centroids,
                               sign=int(entry.get("sign", 1)), top_n=int(doc.get("top_n", entry.get("top_n", 0))),
                               path=path, sha256=self.sha256,
                               class_counts=[all_clusters[j].get("class_counts", []) for j in chosen])


def _document(path, flag):
    """The concepts file's JSON, with its "channels" and "fingerprint"."""
    if not os.path.isfile(path):
        raise UserError(f"{flag}: file not found (get_cosine_similarities.py --label_free writes it)")
    try:
        doc = json.loads(open(path).read())
        doc["channels"], doc["fingerprint"]  # noqa: B018  (both there, or a KeyError / TypeError)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{flag}: not a concepts file ({type(e).__name__}: {e})")
    return doc


def _channel_entry(entries, channel, flag):
    entry = entries.get(str(channel)) if isinstance(entries, dict) else None
    if entry is None:
        have = sorted(int(c) for c in entries) if isinstance(entries, dict) else []
        raise UserError(f"{flag}: channel {channel} is not in the file (it has channels "
                        f"{have[:10]}{' ...' if len(have) > 10 else ''})")
    return entry


def _chosen_clusters(n, clusters, channel, path):
    """The cluster indices used (``clusters``, default all n), checked: in range, each once, at least two."""
    chosen = list(range(n)) if clusters is None else list(clusters)
    bad = [j for j in chosen if not 0 <= j < n]
    if bad:
        raise UserError(f"--clusters {bad[0]}: channel {channel} has clusters 0..{n - 1} in {path}")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"--clusters lists a cluster twice: {chosen}")
    if len(chosen) < 2:
        raise UserError(f"--concepts_file {path}: channel {channel} gives {len(chosen)} concept(s); a split needs "
                        f"at least two clusters")
    return chosen


def _cluster_rows(all_clusters, chosen, channel, flag, num_rows):
    """The sorted rows of each chosen cluster: non-empty, inside the store, disjoint."""
    rows = [np.unique(np.asarray(all_clusters[j]["rows"], dtype=np.int64)) for j in chosen]
    for j, r in zip(chosen, rows):
        if not len(r):
            raise UserError(f"{flag}: cluster {j} of channel {channel} has no rows")
        if num_rows is not None and (r.min() < 0 or r.max() >= num_rows):
            raise UserError(f"{flag}: cluster {j} of channel {channel} names rows outside the store "
                            f"(0..{num_rows - 1})")
    seen = np.concatenate(rows)
    if len(np.unique(seen)) != len(seen):
        raise UserError(f"{flag}: clusters {chosen} of channel {channel} share rows; concepts must be disjoint")
    return rows


def top_positions(summed, sign, n):
    """Positions of the n strongest images: largest sign * summed first, ties by position. (M,) -> (min(n, M),)."""
    return top_k(np.asarray(summed, dtype=np.float64) * sign, n)


def assign_val_concepts(summed, arvs, sign, n, centroids, clusters):
    """Concept ids of the val images: among the top-n by sign * summed activation, concept j (1..k) where the
    nearest of all the channel's centroids is ``clusters[j-1]``; 0 for the others (not top, or nearest to a
    cluster the split does not use).

    summed: (M,); arvs: (M, C_in) per-image ARVs; centroids: (K, C_in); clusters: k cluster indices.
    Returns (M,) int64.
    """
    concept = np.zeros(len(summed), dtype=np.int64)
    top = top_positions(summed, sign, n)
    if not len(top):
        return concept
    nearest = nearest_centroid(torch.as_tensor(np.asarray(arvs)[top]), centroids).numpy()
    for j, cl in enumerate(clusters, start=1):
        concept[top[nearest == cl]] = j
    return concept

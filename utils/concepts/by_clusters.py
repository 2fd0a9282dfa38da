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

from utils.files import store
from utils.run.cli import UserError
from utils.method.clustering import nearest_centroid

# the fingerprint keys that say which model, layer and data made the file (the training split for stage 3)
MODEL_KEYS = ("model", "weights_sha256", "layer", "layer_geometry", "classes")


@dataclass
class ClusterConcepts:
    """One channel's concepts taken from a concepts file."""
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
    flag = f"--concepts_file {path}"
    if not os.path.isfile(path):
        raise UserError(f"{flag}: file not found (get_cosine_similarities.py --label_free writes it)")
    try:
        doc = json.loads(open(path).read())
        entries = doc["channels"]
        fp = doc["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{flag}: not a concepts file ({type(e).__name__}: {e})")
    diff = store.describe_mismatch(fp, fingerprint, keys)
    if diff:
        raise UserError(f"{flag} was made from another store or model: {diff}")
    entry = entries.get(str(channel)) if isinstance(entries, dict) else None
    if entry is None:
        have = sorted(int(c) for c in entries) if isinstance(entries, dict) else []
        raise UserError(f"{flag}: channel {channel} is not in the file (it has channels "
                        f"{have[:10]}{' ...' if len(have) > 10 else ''})")
    all_clusters = entry.get("clusters") or []
    chosen = list(range(len(all_clusters))) if clusters is None else list(clusters)
    bad = [j for j in chosen if not 0 <= j < len(all_clusters)]
    if bad:
        raise UserError(f"--clusters {bad[0]}: channel {channel} has clusters 0..{len(all_clusters) - 1} in {path}")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"--clusters lists a cluster twice: {chosen}")
    if len(chosen) < 2:
        raise UserError(f"{flag}: channel {channel} gives {len(chosen)} concept(s); a split needs at least two "
                        f"clusters")
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
    centroids = torch.tensor([cl["centroid"] for cl in all_clusters], dtype=torch.float64)
    return ClusterConcepts(channel=channel, clusters=chosen, rows=rows, centroids=centroids,
                           sign=int(entry.get("sign", 1)), top_n=int(doc.get("top_n", entry.get("top_n", 0))),
                           path=path, sha256=file_sha256(path),
                           class_counts=[all_clusters[j].get("class_counts", []) for j in chosen])


def top_positions(summed, sign, n):
    """Positions of the n strongest images: largest sign * summed first, ties by position. (M,) -> (min(n, M),)."""
    s = np.asarray(summed, dtype=np.float64) * sign
    return np.lexsort((np.arange(len(s)), -s))[:n]


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

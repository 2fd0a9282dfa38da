"""Label-free concepts of one channel, the math: rank its top images, cluster their per-image ARVs.

A channel's reference images are its top-N training images by summed activation s_n (``exact_top_rows``).
Their per-image ARVs r_n[k] = sum_{i,j} W[c,k,i,j] P_n[k,i,j] are L1-normalised, r_n / sum_k |r_n[k]|, and
clustered with k-means, k chosen by the silhouette over 2..5 unless given (``cluster``); each cluster is a
concept with centroid (mean of the normalised ARVs) and v_j (mean un-normalised ARV). A val image belongs to
the concept whose centroid is nearest to its own normalised ARV (``nearest_centroid``). ``channel_record`` is
the channel's entry of the concepts file (utils/stages/label_free.py describes the file); it reads the
channel's ``TopImages`` and the ``Clustering`` settings (N, k or the ks to choose it from, the k-means seed).
"""
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from utils.method.similarities import summed_activation

SEED = 0            # random_state of k-means: the same store gives the same clusters
N_INIT = 10         # k-means restarts (scikit-learn's n_init)
AUTO_KS = (2, 3, 4, 5)


@dataclass(frozen=True)
class Clustering:
    """How a channel's concepts are found: its top ``top_n`` images, clustered into ``k`` concepts (None: the k
    of ``ks`` with the best silhouette) by k-means with random_state ``seed``."""
    top_n: int = 100
    k: int = None
    ks: tuple = AUTO_KS
    seed: int = SEED


@dataclass(frozen=True, eq=False)
class TopImages:
    """A channel's top images: rows (N,) store rows, strongest first; s (N,) their summed activations s_n;
    arvs (N, C_in) their per-image ARVs r_n; classes (N,) their labels."""
    rows: object
    s: object
    arvs: object
    classes: object


def l1_normalize(arvs, eps=1e-12):
    """r / sum_k |r[k]| row by row: (N, C_in) -> (N, C_in) float64 (a zero row stays zero)."""
    r = torch.as_tensor(arvs).to(torch.float64)
    return r / r.abs().sum(dim=-1, keepdim=True).clamp_min(eps)


def nearest_centroid(arvs, centroids):
    """Index of the nearest centroid (Euclidean, in the L1-normalised space) of each row, first on ties.

    arvs: (N, C_in) un-normalised per-image ARVs; centroids: (k, C_in) means of L1-normalised ARVs.
    Returns (N,) int64.
    """
    d = torch.cdist(l1_normalize(arvs), torch.as_tensor(centroids).to(torch.float64))
    return d.argmin(dim=1)


def exact_top_rows(patch_sums_rows, rows, weight_c, n, sign=1, bias_c=None, positions=1):
    """The top ``n`` of candidate rows by sign * s_n in float64, ties by lower row first.

    patch_sums_rows: (m, C_in, kh, kw) patch sums of the candidate ``rows`` (m,); weight_c: (C_in, kh, kw).
    Returns (order, s): (n,) int64 positions into ``rows`` (strongest first) and (n,) float64 s_n there.
    """
    s = summed_activation(patch_sums_rows, torch.as_tensor(weight_c)[None],
                          None if bias_c is None else torch.as_tensor(bias_c).reshape(1), positions)[:, 0]
    order = np.lexsort((np.asarray(rows), -(sign * s).numpy()))[:n]
    return torch.from_numpy(order), s[order]


def kmeans(points, k, seed=SEED):
    """scikit-learn k-means (n_init = N_INIT, random_state = seed). points: (m, d) -> (m,) int64 labels."""
    from sklearn.cluster import KMeans
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than k: some clusters stay empty (dropped later)
        return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(np.asarray(points)).labels_.astype(np.int64)


def silhouette(points, labels):
    """Mean silhouette (Euclidean) of a labelling, NaN where it is undefined (one cluster, or one per point)."""
    from sklearn.metrics import silhouette_score
    m = len(np.unique(labels))
    return float(silhouette_score(np.asarray(points), labels)) if 2 <= m <= len(labels) - 1 else math.nan


def canonical_labels(labels):
    """Renumber clusters by size (largest first), ties by the first row in them; empty clusters vanish.

    labels: (m,) ints -> (m,) int64 in 0 .. (number of non-empty clusters) - 1.
    """
    labels = np.asarray(labels)
    ids, first, size = np.unique(labels, return_index=True, return_counts=True)
    order = ids[np.lexsort((first, -size))]
    new = np.empty(int(ids.max()) + 1, dtype=np.int64)
    new[order] = np.arange(len(order))
    return new[labels]


def cluster(arvs, k=None, ks=AUTO_KS, seed=SEED):
    """k-means on the L1-normalised ARVs, k by the silhouette score over ``ks`` unless given.

    arvs: (m, C_in) un-normalised per-image ARVs. Returns a dict: 'labels' (m,) int64 (canonical_labels),
    'k' (number of non-empty clusters), 'silhouette' (of the chosen k; NaN if undefined),
    'silhouette_by_k' {k: s} for every k tried. The first k with the highest silhouette wins; if none is
    defined (all normalised ARVs equal, e.g. a dead channel) the first k tried is kept, whatever it gave.
    Threads do not change the result; on ~100 points they only add waiting (label_free.one_thread runs the
    clustering of many channels on one thread).
    """
    X = l1_normalize(arvs).numpy()
    tried = [k] if k is not None else [kk for kk in ks if kk < len(X)]
    fits = {kk: kmeans(X, kk, seed) for kk in tried}
    sil = {kk: silhouette(X, lab) for kk, lab in fits.items()}
    defined = [kk for kk in tried if not math.isnan(sil[kk])]
    pick = max(defined, key=lambda kk: (sil[kk], -kk)) if defined else tried[0]
    labels = canonical_labels(fits[pick])
    return {"labels": labels, "k": int(labels.max()) + 1, "silhouette": sil[pick], "silhouette_by_k": sil}


def purity(labels, classes):
    """Cluster purity: the fraction of all rows that belong to their cluster's most common class.

    labels: (m,) cluster ids; classes: (m,) class indices. Returns (overall, per-cluster list (by cluster id)).
    """
    labels, classes = np.asarray(labels), np.asarray(classes)
    per, hits = [], 0
    for j in range(int(labels.max()) + 1 if len(labels) else 0):
        y = classes[labels == j]
        top = int(np.bincount(y).max()) if len(y) else 0
        hits += top
        per.append(top / len(y) if len(y) else math.nan)
    return hits / max(len(labels), 1), per


def class_counts(classes):
    """[[class index, count], ...] of the rows' classes, most frequent first (ties: lower index first)."""
    ids, counts = np.unique(np.asarray(classes, dtype=np.int64), return_counts=True)
    order = np.lexsort((ids, -counts))
    return [[int(ids[i]), int(counts[i])] for i in order]


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def channel_record(channel, top, class_names, clustering=Clustering(), sign=1):
    """The concepts-file entry of one channel (module docstring) from its top images.

    top: ``TopImages`` (rows (N,), s (N,), arvs (N, C_in), classes (N,)); class_names: list of all class names;
    clustering: k, ks, seed as ``cluster`` (its top_n is not read: N is len(top.rows)); sign: the channel's
    sign of "top".
    """
    rows, s, arvs, classes = top.rows, top.s, top.arvs, top.classes
    res = cluster(arvs, clustering.k, clustering.ks, clustering.seed)
    labels = res["labels"]
    X = l1_normalize(arvs)
    A = torch.as_tensor(arvs).to(torch.float64)
    overall, per = purity(labels, classes)
    clusters = []
    for j in range(res["k"]):
        mask = torch.from_numpy(labels == j)
        counts = class_counts(np.asarray(classes)[labels == j])
        clusters.append({"rows": [int(r) for r in np.asarray(rows)[labels == j]], "size": int(mask.sum()),
                         "centroid": X[mask].mean(dim=0).tolist(), "mean_arv": A[mask].mean(dim=0).tolist(),
                         "classes": {class_names[y]: n for y, n in counts}, "class_counts": counts,
                         "purity": per[j]})
    return {"channel": int(channel), "k": res["k"], "silhouette": _num(res["silhouette"]),
            "silhouette_by_k": {str(kk): _num(v) for kk, v in res["silhouette_by_k"].items()},
            "sign": int(sign), "top_rows": [int(r) for r in rows], "summed_activations": torch.as_tensor(s).tolist(),
            "purity": overall, "clusters": clusters}

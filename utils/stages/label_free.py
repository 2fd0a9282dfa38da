"""Concepts without class labels (after PURE, Dreyer et al. 2024): cluster a channel's per-image ARVs.

The reference images of channel c are its top-N training images by summed activation
s_n = sum_{h,w} a_n[c,h,w] = sum_{k,i,j} W[c,k,i,j] P_n[k,i,j] + b[c] H' W' (closed form from the store's
patch sums P_n, no model pass). Their per-image ARVs r_n[k] = sum_{i,j} W[c,k,i,j] P_n[k,i,j] are
L1-normalised, r_n / sum_k |r_n[k]|, and clustered with k-means; each cluster is a concept, v_j = the mean
un-normalised ARV of its rows. A val image belongs to the concept whose centroid (in the L1-normalised
space) is nearest to its own normalised ARV.

The concepts file (``STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json``) is
  {"fingerprint": {... the store's fingerprint ...}, "top_n": N, "k": "auto" or an int,
   "channels": {"<c>": {"channel": c, "k": k, "silhouette": s, "silhouette_by_k": {"2": s2, ...},
                        "sign": 1 or -1 (-1: a BatchNorm with a negative scale for c follows the layer,
                                         "top" = most negative s_n),
                        "top_rows": [store rows, strongest first],
                        "clusters": [{"rows": [store rows], "size": n,
                                      "centroid": [C_in floats, mean of the L1-normalised ARVs],
                                      "mean_arv": [C_in floats, v_j],
                                      "classes": {"class name": count, ...},
                                      "class_counts": [[class index, count], ...]}, ...]}}}

Added fields (beyond the schema above): per channel "summed_activations" (s_n of "top_rows", in order),
"purity" (fraction of the top-N images that belong to their cluster's most common class) and per
cluster "purity"; at the top level "model", "layer", "seed", "n_init", "ks", "batchnorm" and "sign_note".

How it runs (``discover``): one chunked pass over the patch sums scores every wanted channel at once
(a float32 matrix product per chunk, a running top-2N per channel); each channel's candidates are then
re-ranked exactly in float64 from their own rows, their ARVs computed, and k-means run on one thread
(scikit-learn on 100 points is dominated by per-call overhead, which threads only add to).
"""
import contextlib
import math
import mmap
import os
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from utils.method.similarities import DEFAULT_CHUNK_ROWS, _chunks, arv, read_rows, summed_activation


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


# ---------------------------------------------------------------------------- summed activations, top rows

SEED = 0            # random_state of k-means: the same store gives the same clusters
N_INIT = 10         # k-means restarts (scikit-learn's n_init)
AUTO_KS = (2, 3, 4, 5)
POOL_FACTOR = 2     # the float32 screen keeps POOL_FACTOR * N rows per channel for the exact float64 ranking


def candidate_rows(patch_sums, weight, pool, signs=None, bias=None, positions=1, valid=None,
                   chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """Running top-``pool`` rows of many channels at once by signed summed activation, one chunked pass.

    A float32 screen: each chunk's scores sign[c] * s[n, c] (one matrix product for all channels) are
    merged into the running top rows of each channel. ``exact_top_rows`` then ranks the candidates in
    float64, so the result does not depend on chunking or BLAS rounding unless float32's error exceeds
    the gap between the N-th and the pool-th score.
    patch_sums: (N, C_in, kh, kw) array-like (memory-mapped is fine, read with similarities.read_rows);
    weight: (C, C_in, kh, kw) of the channels wanted; signs: (C,) +1/-1 or None (+1); bias: (C,) or None;
    valid: (N,) bool or None (False: row never chosen, e.g. unreadable images).
    Returns (C, pool) int64 store rows, best first; -1 where fewer than ``pool`` rows exist.
    """
    n = patch_sums.shape[0]
    W = torch.as_tensor(weight).to(torch.float32).flatten(1)
    sign = torch.ones(W.shape[0]) if signs is None else torch.as_tensor(signs).to(torch.float32)
    Ws = W * sign[:, None]
    shift = torch.zeros(W.shape[0]) if bias is None else torch.as_tensor(bias).to(torch.float32) * positions * sign
    best = torch.full((W.shape[0], pool), -math.inf)
    rows = torch.full((W.shape[0], pool), -1, dtype=torch.int64)
    for lo, hi in tqdm(_chunks(n, chunk_rows), desc="summed activations", disable=not progress, unit="chunk"):
        P = torch.from_numpy(np.array(read_rows(patch_sums, lo, hi), dtype=np.float32)).flatten(1)
        scores = torch.addmm(shift[:, None], Ws, P.T)  # (C, m)
        if valid is not None and not np.all(valid[lo:hi]):
            scores[:, ~torch.from_numpy(np.asarray(valid[lo:hi], dtype=bool))] = -math.inf
        top, at = scores.topk(min(pool, hi - lo), dim=1)  # the chunk's own best, then merged with the running ones
        best, idx = torch.cat([best, top], dim=1).topk(pool, dim=1)
        new = at.gather(1, (idx - pool).clamp_min(0)) + lo
        rows = torch.where(idx < pool, rows.gather(1, idx.clamp_max(pool - 1)), new)
    return torch.where(torch.isfinite(best), rows, torch.full_like(rows, -1))


def gather_rows(array, rows):
    """Rows ``rows`` (any order, repeats allowed) of ``array`` as an in-memory numpy array, (len(rows), ...).

    Like similarities.read_rows: a whole-file memory map is read with positional reads (nothing of the
    file gets mapped into the process); anything else is indexed.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
            and getattr(array, "filename", None)):
        size = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
        out = np.empty((len(rows),) + tuple(array.shape[1:]), dtype=array.dtype)
        buf = out.reshape(len(rows), -1).view(np.uint8)
        fd = os.open(array.filename, os.O_RDONLY)
        try:
            for i, r in enumerate(rows.tolist()):
                got = os.preadv(fd, [buf[i]], array.offset + r * size)
                if got != size:
                    raise OSError(f"short read of row {r} of {array.filename}")
        finally:
            os.close(fd)
        return out
    return np.asarray(array[rows])


def exact_top_rows(patch_sums_rows, rows, weight_c, n, sign=1, bias_c=None, positions=1):
    """The top ``n`` of candidate rows by sign * s_n in float64, ties by lower row first.

    patch_sums_rows: (m, C_in, kh, kw) patch sums of the candidate ``rows`` (m,); weight_c: (C_in, kh, kw).
    Returns (order, s): (n,) int64 positions into ``rows`` (strongest first) and (n,) float64 s_n there.
    """
    s = summed_activation(patch_sums_rows, torch.as_tensor(weight_c)[None],
                          None if bias_c is None else torch.as_tensor(bias_c).reshape(1), positions)[:, 0]
    order = np.lexsort((np.asarray(rows), -(sign * s).numpy()))[:n]
    return torch.from_numpy(order), s[order]


# ---------------------------------------------------------------------------- clustering

@contextlib.contextmanager
def one_thread():
    """torch and the BLAS/OpenMP pools (scikit-learn's) on one thread for a block of tiny operations: on
    100 x 512 arrays threads only add waiting, much more so on a busy machine. Results do not change.
    Nested blocks cost nothing (``cluster`` inside ``discover``'s loop): only the outermost sets the limits."""
    global _one_thread_depth
    if _one_thread_depth:
        yield
        return
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _one_thread_depth += 1
    try:
        with threadpool_limits(1):
            yield
    finally:
        _one_thread_depth -= 1
        torch.set_num_threads(before)


_one_thread_depth = 0


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
    """
    X = l1_normalize(arvs).numpy()
    tried = [k] if k is not None else [kk for kk in ks if kk < len(X)]
    with one_thread():
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


# ---------------------------------------------------------------------------- one channel, many channels

def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def channel_record(channel, rows, s, arvs, classes, class_names, k=None, ks=AUTO_KS, sign=1, seed=SEED):
    """The concepts-file entry of one channel (module docstring) from its top rows.

    rows: (N,) store rows, strongest first; s: (N,) their summed activations; arvs: (N, C_in) their
    per-image ARVs; classes: (N,) their labels; class_names: list of all class names.
    """
    res = cluster(arvs, k, ks, seed)
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


def discover(patch_sums, labels, weight, channels, class_names, top_n=100, k=None, ks=AUTO_KS, signs=None,
             bias=None, positions=1, chunk_rows=DEFAULT_CHUNK_ROWS, seed=SEED, progress=False, timings=None):
    """Label-free concepts of many channels from the store: one chunked pass, then per channel its top-N
    rows (exact float64 ranking), their per-image ARVs and the clustering.

    patch_sums: (N, C_in, kh, kw) array-like; labels: (N,) ints, negative = row left out (Store.labels);
    weight: (C_out, C_in, kh, kw) the layer's weight; channels: list of channel indices; signs: (C_out,)
    +1/-1 or None; bias: (C_out,) or None; positions: H' * W'. Returns {channel: channel_record(...)}.
    ``timings``: a dict to receive the wall and CPU seconds of the pass and of the per-channel part.
    """
    labels = np.asarray(labels)
    valid = labels >= 0
    if top_n > int(valid.sum()):
        raise ValueError(f"top_n {top_n} exceeds the {int(valid.sum())} usable rows")
    W = torch.as_tensor(weight)[channels]
    sg = torch.ones(len(channels)) if signs is None else torch.as_tensor(signs)[channels].to(torch.float32)
    b = None if bias is None else torch.as_tensor(bias)[channels]
    pool = min(POOL_FACTOR * top_n, int(valid.sum()))
    clock = [time.perf_counter(), time.process_time()]
    cand = candidate_rows(patch_sums, W, pool, sg, b, positions, valid, chunk_rows, progress)
    clock += [time.perf_counter(), time.process_time()]
    out = {}
    with one_thread():
        for i, c in enumerate(tqdm(channels, desc="clusters", disable=not progress, unit="ch")):
            rows = cand[i][cand[i] >= 0].numpy()
            P = gather_rows(patch_sums, rows)
            order, s = exact_top_rows(P, rows, W[i], top_n, int(sg[i]), None if b is None else b[i], positions)
            top = rows[order.numpy()]
            arvs = arv(W[i], torch.from_numpy(P[order.numpy()]))
            out[int(c)] = channel_record(c, top, s, arvs, labels[top], class_names, k, ks, int(sg[i]), seed)
    if timings is not None:
        clock += [time.perf_counter(), time.process_time()]
        timings.update(pass_s=clock[2] - clock[0], pass_cpu_s=clock[3] - clock[1],
                       per_channel_s=clock[4] - clock[2], per_channel_cpu_s=clock[5] - clock[3])
    return out


# ---------------------------------------------------------------------------- what the model adds (one tiny forward)

def layer_signs_and_positions(model, conv, example):
    """Per-channel sign of "strong" and the layer's number of output positions, from forwards on ``example``.

    example: a small (n, 3, H, W) batch of the data's input size (no image is needed: zeros do).
    Returns (signs, positions, bn_name): signs (C_out,) int64, -1 where the BatchNorm that directly takes
    the layer's output (models.batchnorm_after) has a negative scale for the channel, else +1;
    positions = H' * W'; bn_name the BatchNorm's module path or None.
    """
    from utils.model.tap import layer_input_output
    from utils.model.loading import batchnorm_affine, batchnorm_after
    _, a = layer_input_output(model, conv, example)
    positions = int(a.shape[-2] * a.shape[-1])
    bn = batchnorm_after(model, conv, example)
    signs = torch.ones(conv.out_channels, dtype=torch.int64)
    if bn is None:
        return signs, positions, None
    scale, _ = batchnorm_affine(bn)
    signs[scale < 0] = -1
    name = next(n for n, m in model.named_modules() if m is bn)
    return signs, positions, name


# ---------------------------------------------------------------------------- reporting

def describe_channel(rec, max_classes=6):
    """Printable lines for one channel's entry: k, silhouette, purity, and per cluster its size and classes."""
    sil = "undefined" if rec["silhouette"] is None else f"{rec['silhouette']:.3f}"
    how = "most negative" if rec["sign"] < 0 else "largest"
    lines = [f"channel {rec['channel']}: k = {rec['k']}, silhouette {sil}, purity {rec['purity']:.2f} "
             f"(top {len(rec['top_rows'])} images by {how} summed activation"
             + (", sign -1: a BatchNorm with a negative scale follows)" if rec["sign"] < 0 else ")")]
    for j, cl in enumerate(rec["clusters"]):
        items = list(cl["classes"].items())
        shown = ", ".join(f"{name} {n}" for name, n in items[:max_classes])
        more = f", ... (+{len(items) - max_classes} classes)" if len(items) > max_classes else ""
        lines.append(f"  cluster {j}: {cl['size']} images: {shown}{more}")
    return lines

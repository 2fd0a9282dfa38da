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
"""
import torch


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

"""Stage 2: class histograms, used classes, closed-form activation relevance vectors, cosines.

The functions here take one chunk of rows at a time (``add_*``: a running total plus a chunk), so that the
passes over the store (utils/stages/stage2_passes.py) need a few hundred MB of RAM for a 1.28 M x 2048 store, and no
model pass is made: the ARV of channel c for class y is
R_y^c[k] = sum_{i,j} W[c,k,i,j] * Pbar_y[k,i,j], with Pbar_y the class mean of the patch sums.

The same patch sums give each image's summed activation of every channel, S_n[c] = sum_{h,w} a_n[c,h,w]
= sum_{k,i,j} W[c,k,i,j] P_n[k,i,j] + b[c] H'W' (H' x W' the layer's output size), and, because an
eval-mode BatchNorm is one affine map per channel applied at every position, the summed activation
after a BatchNorm that follows the layer: sum_{h,w} BN(a_n)[c,h,w] = scale[c] S_n[c] + shift[c] H'W'.
``--importance_sign positive_activation`` counts image n for channel c only where that sum is positive
(``add_sign_histograms``): in the ResNet layout a positive attribution also comes from a channel that is
*less* active than usual (negative activation x negative gradient), and the published rule counts it.
What these closed forms read of the layer (W, b, H'W', the BatchNorm's scale and shift, and the sign of "top"
per channel) travels as one ``SummedLayer``.
"""
from dataclasses import dataclass

import numpy as np
import torch

from utils.method.attribution import important_channels

DEFAULT_CHUNK_ROWS = 16384  # about 0.7 GB of working memory for 2048 channels (measured: benchmarks/studies/stage2_memory.py)


def add_class_histogram(hist, A, y, tau):
    """``hist`` plus the counts of one chunk of rows: H[y, c] += images of class y for which c is important.

    hist: (K, C) int64; A: (m, C) channel attributions (float); y: (m,) int64 classes, negative = row left out
    (unreadable images, see Store.labels). Returns (K, C) int64.
    """
    ok = y >= 0
    return hist.index_add(0, y[ok], important_channels(A[ok], tau).to(torch.int64))


def _float64(a):
    """A float64 tensor of a tensor (detached) or array-like (a read-only memory map is copied, never wrapped)."""
    if torch.is_tensor(a):
        return a.detach().to(torch.float64)
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.array(a, dtype=np.float64))
    return torch.as_tensor(a).to(torch.float64)


def summed_activation(patch_sums, weight, bias=None, positions=1):
    """S[n, c] = sum_{h,w} a_n[c,h,w] = sum_{k,i,j} W[c,k,i,j] P_n[k,i,j] + b[c] * H'W', from the patch sums.

    patch_sums: (N, C_in, kh, kw); weight: (C_out, C_in, kh, kw) (or the channels wanted); bias: (C_out,) or
    None; positions: H' * W', the number of output positions of the layer. Tensors or array-likes.
    Returns (N, C_out) float64.
    """
    s = _float64(patch_sums).flatten(1) @ _float64(weight).flatten(1).T
    if bias is not None:
        s = s + _float64(bias) * positions
    return s


@dataclass(frozen=True, eq=False)
class SummedLayer:
    """What the closed form of the summed activation reads of a layer: weight (C_out, C_in, kh, kw) (or the
    channels wanted), bias (C_out,) or None, positions H'W' (the layer's output positions), affine (scale,
    shift) (C_out,) each of the eval-mode BatchNorm that follows the layer, or None, and signs (C_out,) +1/-1
    (the sign of "top" per channel: -1 where that BatchNorm's scale is negative) or None (+1 for all).
    Tensors or array-likes, as the functions that read them take them."""
    weight: object
    bias: object = None
    positions: int = 1
    affine: tuple = None
    signs: object = None

    def channels(self, wanted):
        """The layer of the channels ``wanted`` (list of indices) only: weight, bias, affine and signs
        indexed by them (weight (len(wanted), C_in, kh, kw), ...); positions unchanged."""
        pick = lambda t: None if t is None else torch.as_tensor(t)[wanted]  # noqa: E731
        return SummedLayer(pick(self.weight), pick(self.bias), self.positions,
                           None if self.affine is None else tuple(pick(t) for t in self.affine), pick(self.signs))


def affine_summed(s, scale, shift, positions):
    """sum_{h,w} BN(a)[n,c] = scale[c] * S[n,c] + shift[c] * H'W' for BN(a) = scale * a + shift at each position.

    s: (N, C) summed activations (``summed_activation``); scale, shift: (C,) (``models.batchnorm_affine``).
    Returns (N, C) float64.
    """
    return s.to(torch.float64) * scale.detach().to(torch.float64) + shift.detach().to(torch.float64) * positions


SIGN_HISTOGRAMS = ("published", "positive_activation", "negative_layer_activation")


def add_sign_histograms(hists, A, y, P, tau, layer):
    """``hists`` plus one chunk's counts under the published importance rule and the sign-aware one.

    hists: {name: (K, C) int64} for the names of SIGN_HISTOGRAMS; A: (m, C); y: (m,) int64 (negative: row
    left out); P: (m, C_in, kh, kw) patch sums; layer: a ``SummedLayer`` (weight (C, C_in, kh, kw), bias,
    positions; affine: the BatchNorm that follows the layer, or None: then the layer's own summed activation
    decides; its signs are not read). H[y, c] counts the images of class y for which c is important
    ('published', as ``add_class_histogram``) and moreover
      'positive_activation': the summed activation after the BatchNorm (or the layer's, without one) is > 0;
      'negative_layer_activation': the layer's own summed activation S (before any BatchNorm) is < 0.
    Returns the updated dict.
    """
    ok = y >= 0
    s = summed_activation(P[ok], layer.weight, layer.bias, layer.positions)
    after = s if layer.affine is None else affine_summed(s, layer.affine[0], layer.affine[1], layer.positions)
    imp = important_channels(A[ok], tau)
    masks = (imp, imp & (after > 0), imp & (s < 0))
    return {k: hists[k].index_add(0, y[ok], mask.to(torch.int64)) for k, mask in zip(SIGN_HISTOGRAMS, masks)}


def class_counts(targets, num_classes):
    """N_y: (num_classes,) int64 tensor of images per class (negative targets are not counted)."""
    y = np.array(targets, dtype=np.int64)
    return torch.bincount(torch.from_numpy(y[y >= 0]), minlength=num_classes)


def used_classes(hist, counts, p):
    """Boolean (K, C): channel c uses class y if H[y, c] >= p * N_y (classes without images never count)."""
    counts = counts.to(torch.float64)[:, None]
    return (hist.to(torch.float64) >= p * counts) & (counts > 0)


def add_class_sums(total, P, y):
    """``total`` plus one chunk's patch sums, per class: total[y] += P_n, accumulated in float64.

    total: (K, C_in, kh, kw) float64; P: (m, C_in, kh, kw) float64; y: (m,) int64 (negative: row left out).
    """
    ok = y >= 0
    return total.index_add(0, y[ok], P[ok])


def class_mean_of_sums(total, counts):
    """Pbar[y] = total[y] / N_y (zeros for classes without images). total: (K, ...) float64; counts: (K,)."""
    n = counts.to(torch.float64).clamp_min(1)
    return total / n.view((-1,) + (1,) * (total.dim() - 1))


def rows_mean_patch_sums(patch_sums, rows, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Mean of P_n over the given rows (e.g. all training images of a concept's classes), float64.

    patch_sums: (N, C_in, kh, kw) array-like; rows: sorted list of row indices. Returns (C_in, kh, kw).
    """
    rows = np.asarray(rows, dtype=np.int64)
    total = torch.zeros(tuple(patch_sums.shape[1:]), dtype=torch.float64)
    for lo in range(0, len(rows), chunk_rows):
        part = np.asarray(patch_sums[rows[lo:lo + chunk_rows]], dtype=np.float64)
        total += torch.from_numpy(part).sum(dim=0)
    return total / max(len(rows), 1)


def arv(weight_c, mean_patch_sums):
    """Activation relevance vectors of one channel in closed form.

    weight_c: (C_in, kh, kw) filter of channel c; mean_patch_sums: (..., C_in, kh, kw).
    Returns (..., C_in) float64: r[k] = sum_{i,j} W[c,k,i,j] * P[k,i,j].
    """
    return (mean_patch_sums.to(torch.float64) * weight_c.to(torch.float64)).sum(dim=(-2, -1))


def cosine_matrix(vectors):
    """Pairwise cosine similarity of the rows of ``vectors`` (m, d) -> (m, m); NaN where a norm is 0."""
    v = vectors.to(torch.float64)
    norms = v.norm(dim=1)
    cos = (v @ v.T) / (norms[:, None] * norms[None, :])
    return torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.full_like(cos, float("nan")))


def candidate_pairs(weight, class_means, used, low, high, progress=None):
    """All gamma-polysemantic candidates (c, y1, y2): y1 < y2 both used by c, low <= cos < high.

    weight: (C_out, C_in, kh, kw); class_means: (K, C_in, kh, kw); used: (K, C_out) bool.
    Returns a list of dicts {'channel', 'class1', 'class2', 'cosine_similarity'} sorted by cosine,
    highest first (ties by channel, class1, class2). Pairs with a zero ARV have no cosine and are left out.
    ``progress``: None, or a wrapper of the loop over the channels (a progress bar).
    """
    out = []
    channels = range(weight.shape[0])
    for c in (progress(channels) if progress else channels):
        ys = torch.nonzero(used[:, c]).flatten()
        if len(ys) < 2:
            continue
        cos = cosine_matrix(arv(weight[c], class_means[ys]))
        i, j = torch.triu_indices(len(ys), len(ys), offset=1)
        vals = cos[i, j]
        keep = (vals >= low) & (vals < high)
        for a, b, v in zip(ys[i[keep]].tolist(), ys[j[keep]].tolist(), vals[keep].tolist()):
            out.append({"channel": c, "class1": a, "class2": b, "cosine_similarity": v})
    out.sort(key=lambda d: (-d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))
    return out


def polysemantic_channels(used):
    """Channels that use at least two classes: the only ones that can give candidates. (K, C) -> list."""
    return torch.nonzero(used.sum(dim=0) >= 2).flatten().tolist()


def add_class_histograms(hists, A, y, taus):
    """``add_class_histogram`` at several tau from one chunk: {tau: (K, C) int64} plus the chunk's counts.

    hists: {tau: (K, C) int64} with a key for every tau of ``taus``; A: (m, C); y: (m,) int64 (negative: row
    left out). Each H_tau equals ``add_class_histogram(hist, A, y, tau)``.
    """
    return {t: add_class_histogram(hists[t], A, y, t) for t in taus}


def lowest_pairs(weight, class_means, used, n, progress=None):
    """The ``n`` candidate pairs of lowest cosine whatever the cosine window (stage 2's ``--top N``).

    weight, class_means, used: as ``candidate_pairs``. Every pair (c, y1, y2) of classes both used by c with a
    cosine (no zero ARV) is ranked by (cosine, channel, class1, class2); the first ``n`` are returned in
    ``candidate_pairs``'s order (highest cosine first). Fewer than ``n`` where the layer has fewer pairs.
    """
    every = candidate_pairs(weight, class_means, used, float("-inf"), float("inf"), progress)
    lowest = sorted(every, key=lambda d: (d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))[:n]
    return sorted(lowest, key=lambda d: (-d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))


def threshold_grid(hists, counts, weight, class_means, ps, low, high, progress=None):
    """What a layer offers at each (tau, p) of a grid: the numbers stage 2's advice table shows.

    hists: {tau: (K, C) int64} class histograms H_tau[y, c]; counts: (K,) N_y; weight: (C_out, C_in, kh, kw);
    class_means: (K, C_in, kh, kw); ps: the p values; [low, high): the cosine window. A pair's cosine does not
    depend on tau or p (only on its two classes' mean patch sums and the filter), so the cosines are computed
    once, over the classes each channel uses at any cell of the grid, and each cell keeps its own pairs.
    Returns one dict per cell (taus in the order of ``hists``, then ``ps``): tau, p, ``channels`` (channels
    using two or more classes), ``pairs`` (pairs with low <= cosine < high, what ``candidate_pairs`` lists),
    ``pairs_any_cosine`` (pairs with a cosine) and ``lowest_cosine`` (their lowest cosine, None without any).
    ``progress``: None, or a wrapper of the loop over the channels.
    """
    cells = [(t, p, used_classes(h, counts, p)) for t, h in hists.items() for p in ps]
    union = cells[0][2].clone()
    for _, _, u in cells[1:]:
        union |= u
    per_channel = []
    channels = polysemantic_channels(union)
    for c in (progress(channels) if progress else channels):
        ys = torch.nonzero(union[:, c]).flatten()
        cos = cosine_matrix(arv(weight[c], class_means[ys]))
        i, j = torch.triu_indices(len(ys), len(ys), offset=1)
        vals = cos[i, j]
        ok = ~torch.isnan(vals)
        per_channel.append((c, ys[i][ok], ys[j][ok], vals[ok]))
    rows = []
    for t, p, used in cells:
        window = total = 0
        lowest = None
        for c, a, b, vals in per_channel:
            v = vals[used[a, c] & used[b, c]]
            if len(v):
                total += len(v)
                window += int(((v >= low) & (v < high)).sum())
                m = float(v.min())
                lowest = m if lowest is None else min(lowest, m)
        rows.append({"tau": t, "p": p, "channels": len(polysemantic_channels(used)), "pairs": window,
                     "pairs_any_cosine": total, "lowest_cosine": lowest})
    return rows

"""Stage 4's numbers: how well a disentangled channel separates its k concepts on the val images.

Per image n (layer output a, its gradient g of the label's logit, checkpoint maps D_1 .. D_k, R on the layer's
input; pos(X) = sum_{h,w} max(X, 0)):

- rel_n = pos(a_c * g_c) / sum_c' pos(a_c' * g_c')   the channel's relative attribution to the label;
- orig_n = sum_{h,w} a_c,  maps_n = (sum D_1, ..., sum D_k, sum R),  and their positive masses.

Per concept j (its val images S_j): the separation sep_j = mean_{S_j} pos(D_j) / max_{l != j} mean_{S_j} pos(D_l),
unbounded (None, ``separation_reason`` says why) where that denominator is 0;
the quantitative rows (D_1/orig, ..., D_k/orig, R/orig) of the images with rel >= tau (the paper's table);
the density curves of orig and each map (a Gaussian KDE, as seaborn's kdeplot); the top images of each map.
"""
import numpy as np

from utils.method import attribution, similarities
from utils.method.split import positive_mass


def map_names(k):
    """Names of the maps of a k-way checkpoint: ('D1', ..., 'Dk', 'R')."""
    return tuple(f"D{j}" for j in range(1, k + 1)) + ("R",)


def image_numbers(a, pos, maps, channel):
    """Stage-4 numbers of one channel from the layer's output a (B, C_out, H', W'), pos (B, C_out) =
    sum_{h,w} max(a * g, 0) and the checkpoint's maps (B, k+1, H', W') of D1, ..., Dk, R.

    Returns a dict of tensors: rel (B,) relative attribution of ``channel`` to the label; orig (B,) signed
    spatial sum of the channel's map; maps (B, k+1) signed sums of D1, ..., Dk, R; orig_pos (B,) and
    maps_pos (B, k+1) their positive masses pos(X) = sum max(X, 0).
    """
    return {"rel": attribution.relative_of_positive(pos, channel),
            "orig": a[:, channel].sum(dim=(1, 2)),
            "maps": maps.sum(dim=(2, 3)),
            "orig_pos": a[:, channel].clamp_min(0).sum(dim=(1, 2)),
            "maps_pos": positive_mass(maps)}


def channel_arvs(x, a, conv, channel):
    """Summed activation s (B,) = sum_{h,w} a[:, channel] and per-image ARV r (B, C_in) of ``channel``, float64,
    from the layer's input x (B, C_in, H, W) and output a (B, C_out, H', W') of one forward pass:
    r[n, i] = sum_{kh,kw} W[c, i] P_n[i] with P_n the patch sums of x (``attribution.conv_patch_sums``)."""
    return channels_arvs(x, a, conv, [channel])[0]


def channels_arvs(x, a, conv, channels):
    """``channel_arvs`` of each of ``channels`` from one batch (the patch sums computed once):
    [(s (B,), r (B, C_in))], one pair per channel."""
    P = attribution.conv_patch_sums(x, conv)
    return [(a[:, c].double().sum(dim=(1, 2)), similarities.arv(conv.weight[c].detach(), P)) for c in channels]


def column_means(rows, width):
    """Column means of rows (M, width), or ``width`` NaNs when there is no row."""
    return rows.mean(axis=0) if len(rows) else [float("nan")] * width


def concept_separation(orig_pos, maps_pos, concept, j):
    """Concept j's images (concept == j): how many, sep_j and the mean positive masses.

    orig_pos (N,), maps_pos (N, k+1), concept (N,) ids 1..k. Returns (count, sep_j or None, mean pos of the
    original channel or None, [mean pos of D1, ..., Dk, R] or Nones); None where the concept has no image, sep_j
    None where the denominator is 0 (``separation_reason``).
    """
    sel = concept == j
    if not sel.any():
        return 0, None, None, [None] * maps_pos.shape[1]
    mp = maps_pos[sel]
    others = [m for m in range(maps_pos.shape[1] - 1) if m != j - 1]
    den = max(mp[:, m].mean() for m in others)
    sep = float(mp[:, j - 1].mean() / den) if den > 0 else None
    return int(sel.sum()), sep, float(orig_pos[sel].mean()), [float(mp[:, i].mean()) for i in range(mp.shape[1])]


def separation_reason(count, maps_means, j):
    """Why concept j has no separation (None where it has one): no val image, or a denominator of 0.
    count: its images; maps_means: [mean pos of D1, ..., Dk, R] over them (``concept_separation``)."""
    if count == 0:
        return f"concept {j} has no val image"
    k = len(maps_means) - 1
    others = [m for m in range(k) if m != j - 1]
    if max(maps_means[m] for m in others) > 0:
        return None
    other = f"D{others[0] + 1}" if k == 2 else f"D_l for every l != {j}"
    if maps_means[j - 1] > 0:
        return (f"unbounded: mean pos({other}) over concept {j}'s {count} val images is 0 (mean pos(D{j}) is "
                f"{maps_means[j - 1]:.4g})")
    return f"undefined: mean pos(D{j}) and mean pos({other}) over concept {j}'s {count} val images are all 0"


def quantitative_rows(maps, orig, rel, tau):
    """Rows D1/orig, ..., Dk/orig, R/orig for the images with rel >= tau.
    maps (N, k+1), orig (N,), rel (N,) -> (M, k+1) (k = 2: D1/orig, D2/orig, R/orig)."""
    keep = np.asarray(rel) >= tau
    return np.asarray(maps, dtype=np.float64)[keep] / np.asarray(orig, dtype=np.float64)[keep][:, None]


def top_k(scores, k):
    """Positions of the k largest scores, largest first (ties: lower position first). (N,) -> (min(k,N),)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def kde_curve(values, gridsize=200, cut=3.0):
    """Gaussian KDE as seaborn's kdeplot: Scott's rule, ``gridsize`` points from min - cut*bw to max + cut*bw.

    values: (N,) -> (xs, ys), or None when the density is undefined (fewer than 2 distinct values).
    """
    from scipy.stats import gaussian_kde  # here: only the density curves need scipy
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or np.ptp(v) == 0:
        return None
    kde = gaussian_kde(v, bw_method="scott")
    bw = float(np.sqrt(kde.covariance[0, 0]))
    xs = np.linspace(v.min() - cut * bw, v.max() + cut * bw, gridsize)
    return xs, kde(xs)

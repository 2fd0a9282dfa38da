"""Choosing rho: how well each rho's split separates the concepts, from one pass over their training images.

Published score: for an image of concept j, q_j = pos(D_j) / (max_{l!=j} pos(D_l) + 1e-5), pos(X) =
sum_{h,w} max(X, 0); score = sum_j mean q_j; the best rho is the first maximal one. Robust score
(``robust_scores``): the share s = pos(D_j) / sum_l pos(D_l) of an image's positive mass that its own map
carries (0 when all maps are dead), m_j = mean s over concept j's images, G = (prod_j m_j)^(1/k) in [0, 1]; a
rho where some concept's own map has no positive activation on more than half of its images (``degenerate``)
scores G - 1, so it never beats a rho where every own map is alive on at least half of its images.

The scoring pass (``score_splits``) runs every map of every rho as one convolution on the layer's input x, so
it also compares sum_j D_j - (k-1) R with the layer's own output a[:, c] on every image it sees (max over
images, positions and rho): the first of the two exactness checks, almost for free.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from utils.method.split import filter_maps, merged_map_difference, positive_mass

EPS = 1e-5


def separation_terms(pos, concept):
    """Per-image ratios of the published best-rho score.

    pos: (N, R, k+1) positive masses of [D_1, ..., D_k, R] for R values of rho; concept: (N,) in 1..k (0: none).
    Returns (N, R): q_j = pos(D_j) / (max_{l!=j} pos(D_l) + 1e-5) for an image of concept j (k = 2:
    pos(D1)/(pos(D2)+1e-5) for concept 1, pos(D2)/(pos(D1)+1e-5) for concept 2); 0 for concept 0.
    """
    k = pos.shape[-1] - 1
    d = pos[..., :k]
    out = torch.zeros(pos.shape[:-1], dtype=pos.dtype, device=pos.device)
    for j in range(k):
        others = torch.cat([d[..., :j], d[..., j + 1:]], dim=-1).amax(dim=-1)
        out = torch.where((concept == j + 1)[:, None], d[..., j] / (others + EPS), out)
    return out


def rho_scores_k(sums, counts):
    """score(rho) = sum_j mean q_j from running sums: k (R,) tensors and k image counts -> (R,)."""
    total = sums[0] / max(counts[0], 1)
    for s, n in zip(sums[1:], counts[1:]):
        total = total + s / max(n, 1)
    return total


def own_share(pos, concept):
    """Share of an image's positive mass that its own concept's map carries: pos(D_own) / sum_l pos(D_l).

    pos: (N, R, k+1); concept: (N,) in 1..k. Returns (N, R) float64 in [0, 1]; 0 where every D_l is dead."""
    k = pos.shape[-1] - 1
    d = pos[..., :k].double()
    total = d.sum(dim=-1)
    own = torch.gather(d, -1, (concept.clamp(1, k) - 1).view(-1, 1, 1).expand(d.shape[0], d.shape[1], 1))[..., 0]
    return torch.where(total > 0, own / torch.where(total > 0, total, 1.0), 0.0)


def dead_shares(pos, concept):
    """Fraction of concept j's images on which its own map D_j has no positive activation (pos(D_j) = 0).

    pos: (N, R, k+1); concept: (N,) in 0..k. Returns (R, k) float64 (0 for a concept without images)."""
    k = pos.shape[-1] - 1
    out = torch.zeros((pos.shape[1], k), dtype=torch.float64)
    for j in range(k):
        sel = concept == j + 1
        if bool(sel.any()):
            out[:, j] = (pos[sel][..., j] <= 0).double().mean(dim=0).cpu()
    return out


def degenerate(dead):
    """(R, k) dead shares -> (R,) bool: some concept's own map is dead on more than half of its images."""
    return (torch.as_tensor(dead) > 0.5).any(dim=-1)


def robust_scores(pos, concept):
    """Robust best-rho score of every rho, bounded in [-1, 1]: G - [degenerate], G = (prod_j m_j)^(1/k).

    pos: (N, R, k+1) positive masses of [D_1, ..., D_k, R]; concept: (N,) in 0..k. m_j = mean over concept j's
    images of ``own_share`` (0 for a concept without images). A degenerate rho (``degenerate``: some concept's
    own map dead on more than half of its images) gets G - 1 <= 0 < G of any other rho. Returns (R,) float64.
    """
    k = pos.shape[-1] - 1
    share = own_share(pos, concept)
    means = torch.stack([share[concept == j].mean(dim=0) if bool((concept == j).any())
                         else torch.zeros(pos.shape[1], dtype=torch.float64) for j in range(1, k + 1)], dim=-1)
    g = means.clamp_min(0).prod(dim=-1) ** (1.0 / k)
    return g - degenerate(dead_shares(pos, concept)).double()


def best_rho_index(scores):
    """Index of the first maximal score (float64 comparison)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    return int(torch.nonzero(s == s.max()).flatten()[0])


def concept_ids(keys, concepts):
    """(N,) keys (dataset indices, or labels) -> (N,) concept ids: j for a key in ``concepts[j-1]`` (the last
    such j; concepts are disjoint), 0 for none."""
    c = torch.zeros_like(keys)
    for j, members in enumerate(concepts, start=1):
        c[torch.isin(keys, torch.as_tensor(members, dtype=keys.dtype, device=keys.device))] = j
    return c


class Split:
    """One channel's split filters for every rho and its k concepts: what the scoring pass evaluates.

    filters: (R, k+1, C_in, kh, kw) = split_filters_k(...); bias_c: scalar tensor or None; channel: the layer's
    channel they split (None: no comparison with the layer's output); rows: k lists or arrays of dataset indices,
    concept j's images (disjoint).
    """

    def __init__(self, channel, filters, bias_c, rows):
        if len(rows) != filters.shape[1] - 1:
            raise ValueError(f"{len(rows)} concepts for {filters.shape[1]} filters per rho")
        self.channel, self.filters, self.bias_c = channel, filters, bias_c
        self.rows = [torch.as_tensor(np.asarray(r), dtype=torch.int64) for r in rows]


@dataclass
class SplitScores:
    """What the scoring pass finds for one Split."""
    scores: torch.Tensor  # (R,) float64 published best-rho scores
    images: list          # images scored per concept (k ints)
    max_map_diff: float   # max |sum_j D_j - (k-1) R - a[c]| over those images, their positions and every rho
    max_abs_map: float    # max |a[c]| over the same images (the scale of the relative tolerance)
    pos: torch.Tensor = field(repr=False, default=None)      # (M, R, k+1) float32 positive masses per image
    concept: torch.Tensor = field(repr=False, default=None)  # (M,) int64 concept id (1..k) of each image

    def robust(self):
        """(R,) robust scores (``robust_scores``) of the images scored."""
        return robust_scores(self.pos, self.concept)

    def dead(self):
        """(R, k) dead shares (``dead_shares``) of the images scored."""
        return dead_shares(self.pos, self.concept)


def choose(res, rho_score):
    """Both best-rho choices of one SplitScores and the one ``rho_score`` ('published' or 'robust') keeps.

    Returns a dict: robust (R,), dead (R, k), published_best and robust_best (indices into the rhos),
    degenerate (whether the published choice is), rho_score, best (the index kept)."""
    robust = res.robust()
    dead = res.dead()
    pub, rob = best_rho_index(res.scores), best_rho_index(robust)
    return dict(robust=robust, dead=dead, published_best=pub, robust_best=rob,
                degenerate=bool(degenerate(dead)[pub]), rho_score=rho_score,
                best=pub if rho_score == "published" else rob)


class _Sums:
    """The running sums of one Split during the pass: on the device, no synchronisation per batch."""

    def __init__(self, split, device):
        s = split
        self.nr, self.nf = s.filters.shape[:2]
        self.flat = s.filters.reshape((self.nr * self.nf,) + tuple(s.filters.shape[2:])).to(device)
        self.bias = None if s.bias_c is None else s.bias_c.reshape(1).repeat(self.nr * self.nf).to(device)
        self.sums = [torch.zeros(self.nr, dtype=torch.float64, device=device) for _ in range(self.nf - 1)]
        self.counts = [0] * (self.nf - 1)
        self.pos, self.concept = [], []
        self.diff, self.amax = torch.zeros((), device=device), torch.zeros((), device=device)

    def add(self, conv, x, a_c, concept, device):
        """One batch: x (n, C_in, H, W) the layer's input, a_c (n, H', W') the channel's map or None,
        concept (n,) the images' concept ids on the CPU."""
        n, nr, nf = len(x), self.nr, self.nf
        maps = filter_maps(x, conv, self.flat, self.bias)
        pos = positive_mass(maps).reshape(n, nr, nf)
        cd = concept.to(device, non_blocking=True)
        terms = separation_terms(pos, cd).double()
        for j in range(1, nf):
            self.sums[j - 1] += torch.where((cd == j)[:, None], terms, 0).sum(dim=0)
            self.counts[j - 1] += int((concept == j).sum())
        inside = cd > 0
        self.pos.append(pos)  # images of no concept are dropped at the end (no synchronisation here)
        self.concept.append(cd)
        if a_c is not None:
            d = merged_map_difference(maps.reshape((n, nr, nf) + tuple(maps.shape[2:])), a_c)
            self.diff = torch.maximum(self.diff, torch.where(inside, d, 0).amax())
            self.amax = torch.maximum(self.amax, torch.where(inside, a_c.abs().amax(dim=(1, 2)), 0).amax())

    def result(self):
        pos = torch.cat(self.pos).cpu() if self.pos else torch.zeros((0, self.nr, self.nf))
        concept = torch.cat(self.concept).cpu() if self.concept else torch.zeros(0, dtype=torch.int64)
        pos, concept = pos[concept > 0], concept[concept > 0]
        return SplitScores(rho_scores_k([t.cpu() for t in self.sums], self.counts), list(self.counts),
                           float(self.diff), float(self.amax), pos, concept.to(torch.int64))


def score_splits(conv, splits, batches, device):
    """Best-rho scores of every rho of every Split from one pass, and the exactness of the split on every image.

    batches: iterable of objects with x (B, C_in, H, W) float32 the layer's input, a (B, C_out, H', W') its
    output and indices (B,) int64 the images' dataset indices (``utils.data.scan.ScanBatch``). For each Split
    with images in the batch, its (k+1)R filters run as one convolution on x, and sum_j D_j - (k-1) R of every
    rho is compared with a[:, c]. Images of no concept of a Split do not count for it. Returns one SplitScores
    per Split: the published scores from running sums per concept, and the per-image positive masses
    (M, R, k+1) with their concept ids, from which any other score is a pure function (``robust_scores``).
    """
    acc = [_Sums(s, device) for s in splits]
    for b in batches:
        for s, sums in zip(splits, acc):
            concept = concept_ids(torch.as_tensor(b.indices), s.rows)  # on the CPU
            if bool((concept > 0).any()):
                sums.add(conv, b.x, None if s.channel is None else b.a[:, s.channel].float(), concept, device)
    return [sums.result() for sums in acc]

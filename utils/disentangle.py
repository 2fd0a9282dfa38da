"""Stage 3: split one channel's filter into one filter per concept and a residue, exactly.

k >= 2 concepts with ARVs v_1 .. v_k (mean ARV of channel c over each concept's training images). For one
rho, input channel i of the layer is a source of concept j for the FIRST j with rho*v_j[i] > max_{l!=j} v_l[i];
inputs of no concept form the residue set N. D_j = W[c] with the sources of every other concept zeroed (it
keeps its own sources and N), R = W[c] on N only, so sum_j D_j - (k-1) R = W[c] and the network is unchanged
(with a bias, every D_j and R carry b[c]). For k = 2 this is the published rule: source of concept 1 if
rho*v1[i] > v2[i], else of concept 2 if rho*v2[i] > v1[i]; D1 + D2 - R = W[c].

Best rho, published score: for an image of concept j, q_j = pos(D_j) / (max_{l!=j} pos(D_l) + 1e-5),
pos(X) = sum_{h,w} max(X, 0); score = sum_j mean q_j; the first maximal rho. Robust score (``robust_scores``):
the share s = pos(D_j) / sum_l pos(D_l) of an image's positive mass that its own map carries (0 when all
maps are dead), m_j = mean s over concept j's images, G = (prod_j m_j)^(1/k) in [0, 1]; a rho where some
concept's own map has no positive activation on more than half of its images (``degenerate``) scores G - 1,
so it never beats a rho where every own map is alive on at least half of its images.

Exactness is checked twice, almost for free: the scoring pass computes every map of every rho on the
layer's input anyway, so sum_j D_j - (k-1) R is compared with the layer's own output a[:, c] on every image
it sees (max over images, positions and rho); and the full original and disentangled networks' logits are
compared on a handful of images. Both must agree to TOLERANCE relative (of max(1, max |value|)).
"""
import contextlib
import copy
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.data import folders
from utils.model.tap import layer_input_output
from utils.model.loading import replace_module
from utils.concepts.by_classes import class_batches

TOLERANCE = 1e-4  # relative, of max(1, largest |value|): the split's maps and the logits must agree to it
RHOS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
        0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
EPS = 1e-5


def split_sources_k(arvs, rho):
    """Input channels assigned to each of k concepts: the first j with rho*v_j[i] > max_{l!=j} v_l[i].

    arvs: (k, C_in) ARVs v_1 .. v_k, k >= 2 -> (k, C_in) bool, at most one True per input channel.
    """
    k = arvs.shape[0]
    src = torch.zeros(arvs.shape, dtype=torch.bool, device=arvs.device)
    taken = torch.zeros(arvs.shape[1:], dtype=torch.bool, device=arvs.device)
    for j in range(k):
        others = torch.cat([arvs[:j], arvs[j + 1:]]).amax(dim=0)
        src[j] = ~taken & (rho * arvs[j] > others)
        taken |= src[j]
    return src


def split_filter_k(weight_c, arvs, rho):
    """[D_1, ..., D_k, R] for one rho. weight_c: (C_in, kh, kw); arvs: (k, C_in) -> (k+1, C_in, kh, kw).

    D_j keeps its own sources and the residue N (the inputs of no concept); R keeps N only."""
    src = split_sources_k(arvs, rho)
    k = src.shape[0]
    out = []
    for j in range(k):
        other = torch.cat([src[:j], src[j + 1:]]).any(dim=0)
        out.append(weight_c * (~other).to(weight_c.dtype)[:, None, None])
    out.append(weight_c * (~src.any(dim=0)).to(weight_c.dtype)[:, None, None])
    return torch.stack(out)


def split_filters_k(weight_c, arvs, rhos=RHOS):
    """split_filter_k for every rho: (len(rhos), k+1, C_in, kh, kw)."""
    return torch.stack([split_filter_k(weight_c, arvs, r) for r in rhos])


def split_sources(v1, v2, rho):
    """Two concepts (``split_sources_k`` with k = 2). v1, v2: (C_in,) ARVs -> (src1, src2) bool (C_in,).

    src1 = rho*v1 > v2; src2 = not src1 and rho*v2 > v1."""
    src = split_sources_k(torch.stack([v1, v2]), rho)
    return src[0], src[1]


def split_filter(weight_c, v1, v2, rho):
    """[D1, D2, R] for one rho. weight_c: (C_in, kh, kw); v1, v2: (C_in,) -> (3, C_in, kh, kw)."""
    return split_filter_k(weight_c, torch.stack([v1, v2]), rho)


def split_filters(weight_c, v1, v2, rhos=RHOS):
    """split_filter for every rho: (len(rhos), 3, C_in, kh, kw)."""
    return split_filters_k(weight_c, torch.stack([v1, v2]), rhos)


def merge_weights(k, dtype=torch.float32):
    """The merge of a k-way split: [1, ..., 1, -(k-1)] as (1, k+1, 1, 1) (published [1, 1, -1] for k = 2)."""
    return torch.tensor([1.0] * k + [float(-(k - 1))], dtype=dtype).view(1, k + 1, 1, 1)


def checkpoint_state_dict(filters, bias_c=None):
    """Published checkpoint layout for k = filters.shape[0] - 1 concepts: disentangled.weight (k+1, C_in, kh, kw)
    = [D_1, ..., D_k, R], disentangled.bias (k+1,) = b[c] repeated when the layer has a bias, merged.weight
    (1, k+1, 1, 1) = [1, ..., 1, -(k-1)] (k = 2: [D1, D2, R], [1, 1, -1], the published checkpoint)."""
    n = filters.shape[0]
    sd = {"disentangled.weight": filters.detach().clone().cpu()}
    if bias_c is not None:
        sd["disentangled.bias"] = bias_c.detach().reshape(1).repeat(n).clone().cpu()
    sd["merged.weight"] = merge_weights(n - 1, filters.dtype)
    return sd


def concepts_of_checkpoint(state_dict):
    """k, the number of concepts of a checkpoint: disentangled.weight has k + 1 filters."""
    return int(state_dict["disentangled.weight"].shape[0]) - 1


def checkpoint_name(tag, channel, classes1, classes2, rho, *more):
    """Published file name; ``rho`` a float from RHOS, or 'best'. ``more``: the class lists of concepts 3..k,
    named ``_classes3[...]`` and so on after ``_classes2[...]`` (none for the published k = 2)."""
    return checkpoint_name_k(tag, channel, [classes1, classes2, *more], rho)


def checkpoint_name_k(tag, channel, concepts, rho):
    """``{tag}_channel{c}_classes1{S1}_classes2{S2}[_classes3{S3}...]_f{rho}_unnormalized.pth``."""
    f = "_best" if rho == "best" else str(rho)
    names = "".join(f"_classes{j}{s}" for j, s in enumerate(concepts, start=1))
    return f"{tag}_channel{channel}{names}_f{f}_unnormalized.pth"


def cluster_checkpoint_name(tag, channel, top_n, clusters, rho):
    """Checkpoint of a split by discovered concepts: ``{tag}_channel{c}_top{N}_clusters0-1-2_f{rho}_unnormalized.pth``
    (N: the concepts file's top_n; the cluster indices used, in the order of the concepts)."""
    f = "_best" if rho == "best" else str(rho)
    return f"{tag}_channel{channel}_top{top_n}_clusters{'-'.join(str(j) for j in clusters)}_f{f}_unnormalized.pth"


def disentangled_conv(conv, channel, state_dict):
    """``Sequential(L', M)`` replacing ``conv``, for k = (filters in the checkpoint) - 1 concepts: L' has
    C_out + k output channels (row ``channel`` = D_1, rows C_out .. C_out+k-2 = D_2 .. D_k, row C_out+k-1 = R),
    M is a bias-free 1x1 conv C_out + k -> C_out adding D_2 + ... + D_k - (k-1) R back into ``channel``
    (k = 2: rows C_out = D2, C_out + 1 = R). Same function as ``conv``."""
    c_out = conv.out_channels
    D = state_dict["disentangled.weight"].to(conv.weight)
    k = D.shape[0] - 1
    new = nn.Conv2d(conv.in_channels, c_out + k, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None).to(conv.weight.device)
    merge = nn.Conv2d(c_out + k, c_out, 1, bias=False).to(conv.weight.device)
    with torch.no_grad():
        w = torch.cat([conv.weight, D[1:k + 1]])
        w[channel] = D[0]
        new.weight.copy_(w)
        if conv.bias is not None:
            bk = state_dict["disentangled.bias"].to(conv.bias)
            b = torch.cat([conv.bias, bk[1:k + 1]])
            b[channel] = bk[0]
            new.bias.copy_(b)
        m = torch.zeros(c_out, c_out + k, 1, 1, dtype=conv.weight.dtype, device=conv.weight.device)
        m[torch.arange(c_out), torch.arange(c_out)] = 1
        mw = state_dict["merged.weight"].flatten().to(m)
        m[channel, channel] = mw[0]
        for i in range(k):
            m[channel, c_out + i] = mw[i + 1]
        merge.weight.copy_(m)
    seq = nn.Sequential(new, merge)
    for prm in seq.parameters():
        prm.requires_grad_(False)
    return seq


def disentangled_model(model, layer_path, channel, state_dict):
    """A copy of ``model`` whose layer ``layer_path`` is replaced by ``disentangled_conv``."""
    new = copy.deepcopy(model)
    conv = new.get_submodule(layer_path)
    replace_module(new, layer_path, disentangled_conv(conv, channel, state_dict))
    return new


@contextlib.contextmanager
def disentangled_layer(model, layer_path, channel, state_dict):
    """``model`` itself with its layer ``layer_path`` replaced by ``disentangled_conv`` inside the block;
    the original layer is put back on exit. No copy of the model (``disentangled_model`` copies it)."""
    conv = model.get_submodule(layer_path)
    replace_module(model, layer_path, disentangled_conv(conv, channel, state_dict))
    try:
        yield model
    finally:
        replace_module(model, layer_path, conv)


def filter_maps(x, conv, filters, bias=None):
    """Maps of extra filters on the layer's input, with the layer's geometry.

    x: (N, C_in, H, W); filters: (F, C_in, kh, kw); bias: (F,) or None -> (N, F, H', W').
    """
    return F.conv2d(x, filters.to(x), None if bias is None else bias.to(x),
                    conv.stride, conv.padding, conv.dilation)


def positive_mass(maps):
    """pos(X) = sum_{h,w} max(X, 0): (N, F, H, W) -> (N, F)."""
    return maps.clamp_min(0).sum(dim=(2, 3))


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


def rho_scores(sum_q1, n1, sum_q2, n2):
    """score(rho) = mean q1 + mean q2 from running sums: (R,) tensors and image counts -> (R,)."""
    return rho_scores_k([sum_q1, sum_q2], [n1, n2])


def rho_scores_k(sums, counts):
    """score(rho) = sum_j mean q_j from running sums: k (R,) tensors and k image counts -> (R,)."""
    total = sums[0] / max(counts[0], 1)
    for s, n in zip(sums[1:], counts[1:]):
        total = total + s / max(n, 1)
    return total


def published_scores(pos, concept):
    """The published score of every rho from per-image masses, as a pure function (float64).

    pos: (N, R, k+1) positive masses of [D_1, ..., D_k, R]; concept: (N,) in 0..k. Returns (R,):
    sum_j mean over concept j's images of q_j (``separation_terms``)."""
    k = pos.shape[-1] - 1
    terms = separation_terms(pos, concept).double()
    return rho_scores_k([terms[concept == j].sum(dim=0) for j in range(1, k + 1)],
                        [int((concept == j).sum()) for j in range(1, k + 1)])


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
    """(N,) keys (labels, or dataset indices for concepts given as rows) -> (N,) concept ids: j for a key in
    ``concepts[j-1]`` (the last such j; concepts are disjoint), 0 for none."""
    c = torch.zeros_like(keys)
    for j, members in enumerate(concepts, start=1):
        c[torch.isin(keys, torch.as_tensor(members, dtype=keys.dtype, device=keys.device))] = j
    return c


def concept_of_labels(labels, classes1, classes2):
    """(N,) labels -> (N,) concept ids: 1 for classes1, 2 for classes2, 0 otherwise."""
    return concept_ids(labels, [classes1, classes2])


class Split:
    """One channel's split filters for every rho and its k concepts: what the scoring pass evaluates.

    ``Split(channel, filters, bias_c, concept_1, concept_2, ..., by_rows=False)``. filters: (R, k+1, C_in, kh, kw)
    = split_filters_k(...); bias_c: scalar tensor or None; channel: the layer's channel they split (None: no
    comparison with the layer's output). Each concept is a list of class indices, or with ``by_rows`` a list
    of dataset indices (the loader then yields (images, labels, indices)).
    """

    def __init__(self, channel, filters, bias_c, *concepts, by_rows=False):
        if len(concepts) != filters.shape[1] - 1:
            raise ValueError(f"{len(concepts)} concepts for {filters.shape[1]} filters per rho")
        self.channel, self.filters, self.bias_c, self.by_rows = channel, filters, bias_c, by_rows
        self.concepts = [list(c) for c in concepts]

    @property
    def classes1(self):
        return self.concepts[0]

    @property
    def classes2(self):
        return self.concepts[1]

    @property
    def k(self):
        return len(self.concepts)


@dataclass
class SplitScores:
    """What the scoring pass finds for one Split."""
    scores: torch.Tensor  # (R,) float64 published best-rho scores
    images: list          # images scored per concept (k ints)
    max_map_diff: float   # max |sum_j D_j - (k-1) R - a[c]| over those images, their positions and every rho
    max_abs_map: float    # max |a[c]| over the same images (the scale of the relative tolerance)
    pos: torch.Tensor = field(repr=False, default=None)      # (M, R, k+1) float32 positive masses per image
    concept: torch.Tensor = field(repr=False, default=None)  # (M,) int64 concept id (1..k) of each image

    @property
    def images1(self):
        return self.images[0]

    @property
    def images2(self):
        return self.images[1]

    def robust(self):
        """(R,) robust scores (``robust_scores``) of the images scored."""
        return robust_scores(self.pos, self.concept)

    def dead(self):
        """(R, k) dead shares (``dead_shares``) of the images scored."""
        return dead_shares(self.pos, self.concept)


def merged_map_difference(maps, a_c):
    """max |sum_j D_j - (k-1) R - a_c| per image, over rho and positions.

    maps: (N, R, k+1, H, W) maps of [D_1, ..., D_k, R] for R values of rho; a_c: (N, H, W) the channel's own map.
    Returns (N,).
    """
    k = maps.shape[2] - 1
    merged = maps[:, :, 0]
    for j in range(1, k):
        merged = merged + maps[:, :, j]
    merged = merged - (maps[:, :, k] if k == 2 else (k - 1) * maps[:, :, k])
    return (merged - a_c[:, None]).abs().amax(dim=(1, 2, 3))


def score_splits(model, conv, splits, loader, device, progress=None, channels_last=False):
    """Best-rho scores of every rho of every Split from one pass over ``loader``, and the exactness of
    the split on every image scored.

    Each batch runs the model up to the layer only; the hook gives its input x and output a. For each
    Split with images in the batch, its (k+1)R filters run as one convolution on x, and sum_j D_j - (k-1) R
    of every rho is compared with a[:, c]. Images of no concept of a Split do not count for it; a batch no
    Split needs is not run. ``loader`` yields (images, labels) or (images, labels, dataset indices) (needed by
    Splits whose concepts are rows). Returns a list of SplitScores (one per Split): the published scores from
    running sums per concept, and the per-image positive masses (M, R, k+1) with their concept ids, from
    which any other score is a pure function (``robust_scores``). Sums stay on the device (no
    synchronisation per batch). ``channels_last``: the images go in as channels-last tensors (the caller
    converts the model): the same numbers to float32 rounding, a faster forward on CPUs and recent GPUs.
    """
    banks = []
    for s in splits:
        nr, nf = s.filters.shape[:2]
        flat = s.filters.reshape((nr * nf,) + tuple(s.filters.shape[2:])).to(device)
        bias = None if s.bias_c is None else s.bias_c.reshape(1).repeat(nr * nf).to(device)
        banks.append((flat, bias, nr, nf))
    acc = [{"sums": [torch.zeros(nr, dtype=torch.float64, device=device) for _ in range(nf - 1)],
            "counts": [0] * (nf - 1), "pos": [], "concept": [],
            "diff": torch.zeros((), device=device), "amax": torch.zeros((), device=device)}
           for (_, _, nr, nf) in banks]
    for batch in (progress(loader) if progress else loader):
        images, labels = batch[0], batch[1]
        concepts = [concept_ids(torch.as_tensor(batch[2]) if s.by_rows else labels, s.concepts)
                    for s in splits]  # on the CPU
        needed = [bool((k > 0).any()) for k in concepts]
        if not any(needed):
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x, a = layer_input_output(model, conv, images)
        x, n = x.float(), len(images)
        for s, (flat, bias, nr, nf), concept, need, ac in zip(splits, banks, concepts, needed, acc):
            if not need:
                continue
            maps = filter_maps(x, conv, flat, bias)
            pos = positive_mass(maps).reshape(n, nr, nf)
            cd = concept.to(device, non_blocking=True)
            terms = separation_terms(pos, cd).double()
            for j in range(1, nf):
                ac["sums"][j - 1] += torch.where((cd == j)[:, None], terms, 0).sum(dim=0)
                ac["counts"][j - 1] += int((concept == j).sum())
            inside = cd > 0
            ac["pos"].append(pos)  # images of no concept are dropped at the end (no synchronisation here)
            ac["concept"].append(cd)
            if s.channel is not None:
                a_c = a[:, s.channel].float()
                d = merged_map_difference(maps.reshape((n, nr, nf) + tuple(maps.shape[2:])), a_c)
                ac["diff"] = torch.maximum(ac["diff"], torch.where(inside, d, 0).amax())
                ac["amax"] = torch.maximum(ac["amax"], torch.where(inside, a_c.abs().amax(dim=(1, 2)), 0).amax())
    out = []
    for (_, _, nr, nf), ac in zip(banks, acc):
        pos = torch.cat(ac["pos"]).cpu() if ac["pos"] else torch.zeros((0, nr, nf))
        concept = torch.cat(ac["concept"]).cpu() if ac["concept"] else torch.zeros(0, dtype=torch.int64)
        pos, concept = pos[concept > 0], concept[concept > 0]
        out.append(SplitScores(rho_scores_k([t.cpu() for t in ac["sums"]], ac["counts"]), list(ac["counts"]),
                               float(ac["diff"]), float(ac["amax"]), pos, concept.to(torch.int64)))
    return out


def score_all_rhos(model, conv, all_filters, bias_c, loader, classes1, classes2, device, progress=None, *more):
    """Best-rho scores of every rho from one pass over the concepts' images (``score_splits`` of one Split).

    all_filters: (R, k+1, C_in, kh, kw) = split_filters_k(...); bias_c: scalar tensor or None; ``more``: the
    classes of concepts 3..k. All (k+1)R filters run as one convolution on the layer's input.
    Returns (R,) float64 published scores.
    """
    return score_splits(model, conv, [Split(None, all_filters, bias_c, classes1, classes2, *more)], loader, device,
                        progress)[0].scores


def score_images(model, conv, splits, ds, indices, batch_size, device, num_workers, channels_last=True,
                 progress=None, hint=""):
    """``score_splits`` of ``splits`` over the images ``indices`` of ``ds``: stage 3's one scoring pass.

    indices: (N,) dataset indices in order. Batches hold one class each
    (``triples.class_batches``), so an image's numbers do not depend on which other images are scored:
    several triples' pass gives each triple the bytes of its pass alone. ``channels_last``: the model is
    converted in place (take the split filters from its weights before) and the images go in channels-last:
    the same numbers to float32 rounding, a faster forward on CPUs and recent GPUs (on this project's 2-core
    CPU a ResNet-50 forward takes 0.069 s per image instead of 0.121 s). ``hint``: added to the one-line
    error of an unreadable image. Returns the list of SplitScores of ``score_splits``.
    """
    batches = class_batches(indices, [ds.targets[i] for i in indices], batch_size)
    loader = folders.with_indices(folders.make_loader(ds, batches, num_workers, device, hint=hint), batches)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return score_splits(model, conv, splits, loader, device, progress, channels_last)


def logits(model, images):
    """(N, K) float32 logits, no gradients."""
    with torch.no_grad():
        return model(images).float()


def network_check(model, layer_path, channel, state_dict, images, original_logits=None):
    """max |z' - z| and max |z| of the disentangled and original networks' logits on ``images``, plus z.

    The disentangled network is ``model`` with the layer swapped in place (``disentangled_layer``);
    ``original_logits``: z if already computed on the same images. Returns (diff, zmax, z).
    """
    z = logits(model, images) if original_logits is None else original_logits
    with disentangled_layer(model, layer_path, channel, state_dict) as dm:
        z2 = logits(dm, images)
    return float((z2 - z).abs().max()), float(z.abs().max()), z


def within_tolerance(diff, scale):
    """diff <= TOLERANCE * max(1, scale)."""
    return diff <= TOLERANCE * max(1.0, scale)


def max_logit_difference(model, disentangled, images):
    """max |z' - z| and max |z| of the two networks' logits on ``images`` (float32)."""
    z, z2 = logits(model, images), logits(disentangled, images)
    return float((z2 - z).abs().max()), float(z.abs().max())


def load_disentangled_model(model, weights=None, layer="last_conv", channel=None, checkpoint=None):
    """The disentangled network as a plain ``nn.Module`` (eval mode, frozen), for other tools (captum, a
    feature visualization of your own): the model flags of the stage scripts plus a published checkpoint.

    ``model``, ``weights``, ``layer``: as ``--model``, ``--weights``, ``--layer_of_interest``;
    ``channel``: the split channel c; ``checkpoint``: a ``…_unnormalized.pth`` path or its state dict.
    The layer becomes ``Sequential(L', M)``: ``net.get_submodule(layer)[0]`` outputs C_out + k maps, k read from
    the checkpoint (row c = D1, rows C_out .. C_out+k-2 = D2 .. Dk, row C_out+k-1 = R; k = 2: row C_out = D2,
    row C_out + 1 = R); the Sequential's output, and the logits, equal the original's.
    ``disentangle_channel.py --export_model`` writes this network's state dict (``…_f_best_model.pth``),
    which ``load_state_dict`` accepts on the returned module.
    """
    from utils.model import loading
    from utils.run.cli import UserError
    base, _ = loading.load_model(model, weights)
    path, conv = loading.resolve_layer(base, layer)
    if channel is None or not 0 <= channel < conv.out_channels:
        raise UserError(f"channel {channel}: layer {path} has channels 0..{conv.out_channels - 1}")
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True) if isinstance(checkpoint, (str, bytes)) \
        or hasattr(checkpoint, "__fspath__") else checkpoint
    problem = checkpoint_problem(sd, conv)
    if problem:
        raise UserError(f"{checkpoint if not isinstance(checkpoint, dict) else 'the checkpoint'}: {problem} for "
                        f"layer {path}")
    return disentangled_model(base, path, channel, sd).eval()


def checkpoint_problem(sd, conv):
    """Why the state dict ``sd`` is not a k-way checkpoint (k >= 2, read from it) of a channel of ``conv``, or
    None: disentangled.weight (k+1, C_in, kh, kw), merged.weight (1, k+1, 1, 1), disentangled.bias (k+1,)
    exactly when the layer has a bias."""
    d = sd.get("disentangled.weight") if isinstance(sd, dict) else None
    shape = tuple(conv.weight.shape[1:])
    if d is None or d.dim() != 4 or d.shape[0] < 3 or tuple(d.shape[1:]) != shape:
        return (f"disentangled.weight has shape {None if d is None else tuple(d.shape)}, expected (k+1, "
                f"{', '.join(map(str, shape))}) with k >= 2 concepts")
    n = d.shape[0]
    m = sd.get("merged.weight")
    if m is None or tuple(m.shape) != (1, n, 1, 1):
        return f"merged.weight has shape {None if m is None else tuple(m.shape)}, expected {(1, n, 1, 1)}"
    b = sd.get("disentangled.bias")
    if (conv.bias is None) != (b is None) or (b is not None and tuple(b.shape) != (n,)):
        return (f"disentangled.bias is {None if b is None else tuple(b.shape)}, expected "
                f"{None if conv.bias is None else (n,)}")
    return None


def exported_state_dict(dmodel):
    """The disentangled network's state dict as plain, contiguous CPU tensors (nothing shared, no views)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in dmodel.state_dict().items()}


def export_model(base, dmodel, model_spec, weights_id, layer_path, conv, channel, checkpoint_path):
    """Write ``{base}_f_best_model.pth`` (``exported_state_dict``) and ``{base}_f_best_model.json`` saying how
    to rebuild the network. Returns the two paths."""
    from utils.files import atomic
    c_out = conv.out_channels
    k = dmodel.get_submodule(layer_path)[0].out_channels - c_out
    rows = {"D1": channel, **{f"D{j}": c_out + j - 2 for j in range(2, k + 1)}, "R": c_out + k - 1}
    geometry = (f"kernel_size={tuple(conv.kernel_size)}, stride={tuple(conv.stride)}, padding={tuple(conv.padding)}, "
                f"dilation={tuple(conv.dilation)}, bias={conv.bias is not None}")
    weights = None if weights_id == "factory" else weights_id
    pth, js = base + "_f_best_model.pth", base + "_f_best_model.json"
    atomic.save_torch(pth, exported_state_dict(dmodel))
    atomic.write_json(js, {
        "model": model_spec, "weights": weights, "layer": layer_path, "channel": channel,
        "checkpoint": os.path.basename(checkpoint_path), "state_dict": os.path.basename(pth),
        "layer_replaced_by": [f"Conv2d({conv.in_channels}, {c_out + k}, {geometry})",
                              f"Conv2d({c_out + k}, {c_out}, kernel_size=(1, 1), bias=False)"],
        "rows_of_first_conv": rows,
        "rebuild": (f"from utils.disentangle import load_disentangled_model; "
                    f"net = load_disentangled_model({model_spec!r}, {weights!r}, {layer_path!r}, {channel}, "
                    f"{os.path.basename(checkpoint_path)!r}); net.load_state_dict(torch.load({os.path.basename(pth)!r}))"),
        "without_this_code": (f"replace {layer_path} by torch.nn.Sequential of the two convs above, then "
                              f"load_state_dict(torch.load({os.path.basename(pth)!r}))")})
    return pth, js

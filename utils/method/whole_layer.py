r"""The whole layer disentangled: every split channel of one conv layer replaced at once, exactly.

A conv layer with weight W (C_out, C_in, kh, kw) and S split channels c, each with its k_c >= 2 filters
D_{c,1} .. D_{c,k_c} and residue R_c (stage 3's checkpoint), becomes one wide conv L' with
    M = C_out - S + sum_c (k_c + 1)
output rows, followed by a fixed merge that gives back the C_out maps:
    a_c = D_{c,1} + ... + D_{c,k_c} - (k_c - 1) R_c       (a split channel; k = 2: D1 + D2 - R)
    a_c = row of c                                         (an untouched channel)
The rows of L' follow the layer's channel order: an untouched channel has one row, a split channel its
k_c + 1 rows D_{c,1} .. D_{c,k_c}, R_c in a block. Each row feeds exactly one output channel, so the merge is
the (C_out, M) matrix with one non-zero per column: a ``target`` channel and a ``coeff`` (1 for an untouched
row and every D_j, -(k_c - 1) for R_c, as the checkpoint's merge weights say) per row. Applied as
    out[:, target[m]] += coeff[m] * maps[:, m]
in passes (``merge_passes``) in which no two rows share a target, so that every sum is taken in row order
on any device (no atomic adds: the same bits on every run), it costs max_c (k_c + 1) passes over parts of
the maps, where the same merge as a dense 1x1 conv would hold C_out * M weights
(ResNet-50's last conv with 500 split channels: 2048 x 3048 = 6.2 M, 25 MB, and 2048 * 3048 multiply-adds
per position, more than the layer's own 512 * 2048).

The layer's units are its untouched channels and every D_{c,j}; the R_c are not units (they carry what
no concept claims, and enter the merge with a negative weight).
"""
import torch

RESIDUE = "R"


def row_layout(c_out, ks):
    """The rows of the wide conv L': a list of M pairs (channel, part), part None for an untouched channel,
    j in 1..k for D_j, ``"R"`` for the residue.

    c_out: the layer's output channels; ks: {channel: k} for the split channels (k >= 2)."""
    rows = []
    for c in range(c_out):
        if c in ks:
            rows += [(c, j) for j in range(1, ks[c] + 1)] + [(c, RESIDUE)]
        else:
            rows.append((c, None))
    return rows


def units(layout):
    """The layer's units: [(row, channel, part)] for every row of ``layout`` that is not a residue."""
    return [(m, c, part) for m, (c, part) in enumerate(layout) if part != RESIDUE]


def wide_filters(weight, bias, splits, layout):
    """The filters of L'.

    weight: (C_out, C_in, kh, kw); bias: (C_out,) or None; splits: {channel: (filters, bias_c)} with filters
    (k+1, C_in, kh, kw) = [D_1 .. D_k, R] and bias_c (k+1,) or None; layout: ``row_layout``.
    Returns ((M, C_in, kh, kw), (M,) or None)."""
    rows_w, rows_b = [], []
    for c, part in layout:
        i = None if part is None else (splits[c][0].shape[0] - 1 if part == RESIDUE else part - 1)
        rows_w.append(weight[c] if i is None else splits[c][0][i].to(weight))
        if bias is not None:
            rows_b.append(bias[c] if i is None else splits[c][1][i].to(bias))
    return torch.stack(rows_w), (None if bias is None else torch.stack(rows_b))


def merge_entries(layout, merges, dtype=torch.float32):
    """The merge's non-zeros, one per row of L': (target (M,) int64, coeff (M,)).

    merges: {channel: (k+1,) merge weights [1, .., 1, -(k-1)] of its checkpoint}."""
    target = torch.tensor([c for c, _ in layout], dtype=torch.int64)
    coeff = []
    for c, part in layout:
        if part is None:
            coeff.append(1.0)
        else:
            m = merges[c].flatten()
            coeff.append(float(m[-1] if part == RESIDUE else m[part - 1]))
    return target, torch.tensor(coeff, dtype=dtype)


def merge_passes(target):
    """The rows of L' in passes with distinct targets: [(rows (P_s,), their targets (P_s,))], pass s holding the
    s-th row (in row order) of every target with more than s rows. target: (M,) int64."""
    order = torch.argsort(target, stable=True)
    ordered = target[order]
    rank = torch.empty_like(target)
    rank[order] = torch.arange(target.shape[0], device=target.device) - torch.searchsorted(ordered, ordered)
    passes = []
    for s in range(int(rank.max()) + 1 if target.numel() else 0):
        rows = torch.nonzero(rank == s).flatten()
        passes.append((rows, target[rows]))
    return passes


def merge_maps(maps, target, coeff, c_out, passes=None):
    """The layer's maps from those of L': (N, M, H, W) -> (N, C_out, H, W), out[:, target[m]] += coeff[m] maps[:, m],
    the rows of one target added in row order. ``passes``: ``merge_passes(target)`` if already computed."""
    weighted = maps * coeff.to(maps).view(1, -1, *([1] * (maps.dim() - 2)))
    out = maps.new_zeros((maps.shape[0], c_out) + tuple(maps.shape[2:]))
    for rows, targets in (merge_passes(target.to(maps.device)) if passes is None else passes):
        out[:, targets] += weighted[:, rows]
    return out


def merge_matrix(target, coeff, c_out):
    """The merge as a dense (C_out, M) matrix (a 1x1 conv's weight without its two trailing dims)."""
    m = torch.zeros((c_out, target.shape[0]), dtype=coeff.dtype)
    m[target, torch.arange(target.shape[0])] = coeff
    return m
